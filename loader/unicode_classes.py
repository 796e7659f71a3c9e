"""The Unicode classes GPT-2's pre-tokenizer pattern uses (\\p{L}, \\p{N}, \\s), as code-point ranges for SQL.

PostgreSQL's regex classes depend on the server's locale and differ from Unicode's, so the loader stores the
classes themselves, computed by the same `regex` module the reference tokenizer uses.
"""

from __future__ import annotations

from functools import lru_cache

import regex

MAX_CODE_POINT = 0x10FFFF
CLASSES = (("L", r"\p{L}+"), ("N", r"\p{N}+"), ("S", r"\s+"))
BLOCK = 1 << 16  # code points scanned at a time


@lru_cache(maxsize=1)
def class_ranges() -> list[tuple[int, str]]:
    """A partition of all code points into runs: [(first code point, class)], class in L, N, S, O. Computed a
    block of code points at a time (the classes are per character): a whole-range string and its list of code
    points would hold over 100 MB for a moment, more than a load's largest tensor."""
    cls = bytearray(b"O" * (MAX_CODE_POINT + 1))
    for start in range(0, MAX_CODE_POINT + 1, BLOCK):
        # Surrogates cannot appear in valid UTF-8 text; leave them out of the scanned string and call them O.
        code_points = [c for c in range(start, min(start + BLOCK, MAX_CODE_POINT + 1)) if not 0xD800 <= c <= 0xDFFF]
        text = "".join(map(chr, code_points))
        for name, pattern in CLASSES:
            for m in regex.finditer(pattern, text):
                for i in range(m.start(), m.end()):
                    cls[code_points[i]] = ord(name)
    ranges: list[tuple[int, str]] = []
    for cp in range(MAX_CODE_POINT + 1):
        if not ranges or ranges[-1][1] != chr(cls[cp]):
            ranges.append((cp, chr(cls[cp])))
    return ranges
