"""The NumPy-side reference tokenizer against tiktoken's GPT-2 encoding, built offline from the real files.

tiktoken is an independent implementation (Rust regex engine, byte-level BPE ranked by merged-token bytes rather
than by merge pair), so agreement on the whole `corpus` is strong evidence that `gpt_sql.runner.tokenizer` is
OpenAI's encoder. `tiktoken.get_encoding("gpt2")` would download the vocabulary; here the mergeable ranks are
built from `/work/shared/gpt2/{encoder.json,vocab.bpe}` instead.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).parent))  # noqa: E401,E702  (`import corpus`)

import hashlib
import json
import os
from pathlib import Path

import pytest
import regex

import corpus
from conftest import require
from gpt_sql.runner.tokenizer import PATTERN, Tokenizer

GPT2_DIR = Path(__file__).resolve().parents[2] / "shared" / "gpt2"
ENCODER_JSON = GPT2_DIR / "encoder.json"
VOCAB_BPE = GPT2_DIR / "vocab.bpe"
EOT = "<|endoftext|>"
EOT_ID = 50256

# sha256 of OpenAI's published files (the hashes tiktoken_ext.openai_public pins for "gpt2").
OPENAI_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}

# Two spellings of GPT-2's pre-tokenizer, both run by tiktoken's (Rust, fancy-regex) engine:
# tiktoken's own r50k/gpt2 pattern (possessive quantifiers, `\s++$` fast path) and OpenAI's original encoder.py one.
GPT2_PATTERNS = {
    "tiktoken_r50k": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "openai_encoder_py": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
}

pytestmark = pytest.mark.skipif(
    not (ENCODER_JSON.is_file() and VOCAB_BPE.is_file()),
    reason=f"GPT-2 vocabulary files absent: need {ENCODER_JSON} and {VOCAB_BPE}",
)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def encoder() -> dict[str, int]:
    return json.loads(ENCODER_JSON.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def merges() -> list[tuple[str, str]]:
    # Exactly as OpenAI's encoder.py reads it: drop the "#version" header and the trailing empty line.
    text = VOCAB_BPE.read_text(encoding="utf-8")
    return [tuple(line.split()) for line in text.split("\n")[1:-1]]


@pytest.fixture(scope="module")
def reference(encoder, merges) -> Tokenizer:
    return Tokenizer(encoder, merges)


def _own_mergeable_ranks(encoder: dict[str, int]) -> dict[bytes, int]:
    """bytes -> rank, where rank = id in encoder.json; GPT-2's byte alphabet rebuilt independently of the project:
    printable non-space Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100.. in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in char_to_byte.values()]
    char_to_byte.update({chr(256 + n): b for n, b in enumerate(others)})
    return {bytes(char_to_byte[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}


@pytest.fixture(scope="module")
def mergeable_ranks(encoder) -> dict[bytes, int]:
    require("tiktoken", reason="tiktoken is not installed (pip install tiktoken)")
    own = _own_mergeable_ranks(encoder)
    try:
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        return own
    # tiktoken's loader reads local paths; TIKTOKEN_CACHE_DIR="" stops it copying them into a temp-dir cache.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        # It asserts internally that merge order == encoder.json ids (see test_merge_rank_equals_token_id).
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(VOCAB_BPE), encoder_json_file=str(ENCODER_JSON))
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    assert ranks == own, "tiktoken's data-gym loader and the byte map built here disagree"
    return ranks


@pytest.fixture(scope="module", params=sorted(GPT2_PATTERNS))
def tik(request, mergeable_ranks):
    tiktoken = require("tiktoken", reason="tiktoken is not installed (pip install tiktoken)")
    return tiktoken.Encoding(
        name=f"gpt2-local-{request.param}",
        pat_str=GPT2_PATTERNS[request.param],
        mergeable_ranks=mergeable_ranks,
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=50257,
    )


# ------------------------------------------------------------------------------------------------ the corpus


def test_corpus_is_deterministic_and_well_formed():
    cats = corpus.corpus()
    fresh = corpus._corpus.__wrapped__()  # a second, uncached build
    assert [(k, list(v)) for k, v in fresh] == list(cats.items())
    assert corpus.all_strings() == [s for v in cats.values() for s in v]
    assert sum(map(len, cats.values())) >= 5000
    for name, strings in cats.items():
        if name == "shakespeare" and not corpus.shakespeare_available():
            assert strings == []
            continue
        assert len(strings) >= 50, name
        for s in strings:
            assert len(s) <= corpus.MAX_LEN, (name, s[:40])
            s.encode("utf-8")  # raises on lone surrogates
    assert sum(map(len, cats.values())) - len(cats["mixtures"]) < 4 * len(cats["mixtures"])
    assert any(EOT in s for s in cats["mixtures"]) and all(EOT in s for s in cats["endoftext"][:3])


# ------------------------------------------------------------------------------------------------ equality


def _diagnose(ref: Tokenizer, tik, s: str) -> str:
    ours, theirs = ref.encode(s), tik.encode_ordinary(s)
    pieces_ours = regex.findall(PATTERN, s)
    pieces_theirs = regex.findall(tik._pat_str, s)
    lines = [f"  text   {s[:200]!r}", f"  ours   {ours[:40]}", f"  tiktok {theirs[:40]}"]
    if pieces_ours != pieces_theirs:
        lines.append(f"  pre-tokens differ: ours {pieces_ours[:20]!r} vs tiktoken {pieces_theirs[:20]!r}")
    else:
        lines.append("  pre-tokens agree (under Python `regex`), so BPE or the Rust regex engine differs")
    return "\n".join(lines)


def test_token_ids_equal_tiktoken_on_whole_corpus(reference, tik):
    cats = corpus.corpus()
    n = 0
    failures = []
    for name, strings in cats.items():
        for s in strings:
            n += 1
            if reference.encode(s) != tik.encode_ordinary(s):
                failures.append((name, s))
    report = "\n".join(f"[{name}]\n{_diagnose(reference, tik, s)}" for name, s in failures[:15])
    assert not failures, f"{len(failures)}/{n} strings tokenize differently from tiktoken ({tik.name}):\n{report}"
    assert n >= 5000


def test_decode_roundtrip(reference, tik):
    bad = []
    for s in corpus.all_strings():
        ids = reference.encode(s)
        if reference.decode(ids) != s or tik.decode(ids) != s or reference.decode_bytes(ids) != s.encode("utf-8"):
            bad.append(s)
    assert not bad, f"{len(bad)} strings do not round-trip, e.g. {bad[:5]!r}"


def test_endoftext_in_text_is_plain_text(reference, tik):
    for s in (EOT, "a" + EOT + "b", " " + EOT + "\n" + EOT):
        ids = reference.encode(s)
        assert EOT_ID not in ids
        assert ids == tik.encode_ordinary(s)
        assert reference.decode(ids) == s
    assert reference.encode(EOT) == [27, 91, 437, 1659, 5239, 91, 29]  # "<", "|", "end", "of", "text", "|", ">"
    assert tik.encode(EOT, allowed_special="all") == [EOT_ID]
    assert reference.decode([EOT_ID]) == EOT


def test_known_encodings(reference):
    # Spot checks that hold for OpenAI's GPT-2 tokenizer.
    assert reference.encode("Hello world") == [15496, 995]
    assert reference.encode(" Hello") == [18435]
    assert reference.encode("\n") == [198]
    assert reference.encode(" ") == [220]
    assert reference.encode("I'm") == [40, 1101]


# ------------------------------------------------------------------------------------------------ vocab facts


def test_files_are_openais_gpt2_vocabulary():
    for name, digest in OPENAI_SHA256.items():
        assert hashlib.sha256((GPT2_DIR / name).read_bytes()).hexdigest() == digest, f"{name} is not OpenAI's"


def test_vocabulary_shape(encoder, merges):
    assert len(encoder) == 50257
    assert sorted(encoder.values()) == list(range(50257))
    assert encoder[EOT] == EOT_ID == max(encoder.values())
    assert len(merges) == 50000
    assert all(len(m) == 2 for m in merges)
    assert len(set(merges)) == len(merges)


def test_byte_tokens_are_ids_0_to_255(encoder):
    """The 256 single-byte tokens are exactly ids 0..255 -- but ordered by GPT-2's byte alphabet, not by byte value:
    the 188 printable bytes (33..126, 161..172, 174..255) come first in byte order, then the other 68 bytes."""
    be = {}
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    for n, b in enumerate(others):
        be[b] = chr(256 + n)
    for b in printable:
        be[b] = chr(b)
    ids = {b: encoder[be[b]] for b in range(256)}
    assert sorted(ids.values()) == list(range(256))
    assert [b for b, _ in sorted(ids.items(), key=lambda kv: kv[1])] == printable + others
    assert len(printable) == 188
    assert ids[ord("!")] == 0 and ids[0] == 188 and ids[ord(" ")] == 220 and ids[ord("\n")] == 198
    assert ids != {b: b for b in range(256)}  # id != byte value
    # Every other token is longer than one character (one byte).
    assert all(len(t) > 1 for t, i in encoder.items() if i >= 256)


def test_merge_rank_equals_token_id(encoder, merges):
    """Merge number r (0-based line after the header) creates token id 256 + r; so ranking merged tokens by id
    (tiktoken) and ranking pairs by merge number (OpenAI, the reference) agree, and merged strings are unique."""
    wrong = [(r, a, b) for r, (a, b) in enumerate(merges) if encoder.get(a + b) != 256 + r]
    assert not wrong, f"{len(wrong)} merges break id == 256 + rank, e.g. {wrong[:5]}"
    # Both halves of every merge are tokens created earlier (smaller id) than the merge itself.
    late = [(r, a, b) for r, (a, b) in enumerate(merges) if not (encoder[a] < 256 + r and encoder[b] < 256 + r)]
    assert not late, f"{len(late)} merges use a part that is created later, e.g. {late[:5]}"
