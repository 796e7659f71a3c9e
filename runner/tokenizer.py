"""OpenAI's GPT-2 tokenizer algorithm: byte<->unicode map, the GPT-2 pre-tokenizer regex, BPE by merge rank.

This is the reference the SQL tokenizer is tested against.
"""

from __future__ import annotations

from functools import lru_cache

import regex

# GPT-2's pre-tokenizer; `<|endoftext|>` in text is *not* special here, as in OpenAI's encoder.
PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def pretokenize(text: str) -> list[str]:
    return PATTERN.findall(text)


class Tokenizer:
    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until no ranked pair is left."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, -1), i) for i, pair in enumerate(zip(parts, parts[1:]))]
            ranked = [(r, i) for r, i in ranked if r >= 0]
            if not ranked:
                break
            _, i = min(ranked)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in pretokenize(text):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self.bpe(word))
        return ids

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.byte_decoder[c] for c in self.decoder[token])

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self.token_bytes(t) for t in tokens)

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")
