"""A deterministic tokenizer test corpus: `corpus()` -> {category: [strings]}, about 6,000 strings.

Every run yields the same strings in the same order (one `random.Random` per category with a fixed seed,
no time, no set/hash iteration order). Every string is valid Unicode (no lone surrogates) and at most
`MAX_LEN` characters. The `shakespeare` category reads `/work/shared/corpora/tinyshakespeare.txt` and is
empty when that file is absent (`shakespeare_available()` says which); no other category depends on it.

Run `python tests/corpus.py` for a per-category count.
"""

from __future__ import annotations

import random
import unicodedata
from functools import lru_cache
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tinyshakespeare.txt"
MAX_LEN = 2000
SEED = 20261123

# --------------------------------------------------------------------------------------------- pools

ENGLISH_WORDS = (
    "the of and to in is was that for it with as his on be at by had this not but from are or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first any my "
    "now such like our over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state good very make world "
    "still own see men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three quick brown fox jumps "
    "lazy dog hello world tokenizer postgres recursive query attention transformer embedding"
).split()

CONTRACTION_SUFFIXES = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
CONTRACTION_WORDS = (
    "I'm", "I've", "I'll", "I'd", "you're", "you've", "you'll", "you'd", "he's", "she's", "it's", "it'd",
    "we're", "we've", "we'll", "we'd", "they're", "they've", "they'll", "they'd", "don't", "doesn't", "didn't",
    "can't", "won't", "wouldn't", "shouldn't", "couldn't", "isn't", "aren't", "wasn't", "weren't", "hasn't",
    "haven't", "hadn't", "mustn't", "needn't", "shan't", "that's", "there's", "what's", "who's", "let's",
    "y'all", "o'clock", "rock'n'roll", "ma'am", "ne'er", "o'er", "'tis", "'twas", "know't", "on't", "is't",
    "John's", "James'", "the dogs'", "y'all'd've", "fo'c'sle", "l'amour", "d'Artagnan", "O'Neill", "'em",
)
APOSTROPHES = ("'", "\u2019", "\u2018", "\u02bc", "`", "\u00b4", "\u2032")

UNICODE_SPACES = (
    "\u00a0", "\u1680", "\u2000", "\u2001", "\u2002", "\u2003", "\u2004", "\u2005", "\u2006", "\u2007",
    "\u2008", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u0085",
)
ZERO_WIDTH = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff")
ASCII_WS = (" ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c")
CONTROL = tuple(chr(c) for c in list(range(0, 9)) + [0x0E, 0x0F, 0x10, 0x1B, 0x1C, 0x1D, 0x1E, 0x1F, 0x7F]) + (
    "\u0080", "\u009f", "\u180e", "\u00ad", "\u061c", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066",
    "\u2069", "\ufff9", "\ufffc", "\ufffd", "\U000e0001", "\U000e0041",
)
PUNCT_CHARS = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "¡¿«»‹›“”„‘’‚–—―…·•‰′″§¶†‡©®™°±×÷¬¦¨¯´¸€£¥¢¤"

ACCENTED_WORDS = (
    "café", "naïve", "résumé", "façade", "jalapeño", "Ångström", "Øresund", "Æsir", "smörgåsbord", "Dvořák",
    "Łódź", "Kraków", "Škoda", "Zürich", "Müller", "Straße", "garçon", "crème brûlée", "über", "São Paulo",
    "Ærøskøbing", "Þórr", "ðæt", "İstanbul", "ığdır", "Ğ", "ŠŽČĆĐ", "ÀÉÎÕÜ", "àéîõü", "ÿ", "Ÿ", "ß", "ẞ",
    "Việt Nam", "Nguyễn", "tiếng Việt", "Hà Nội", "ǅemal", "ǈ", "ﬁnance", "ﬂow", "œuvre", "Œ", "Ĳssel",
    "Māori", "ʻōlelo", "Hawaiʻi", "Ţară", "ş", "ą", "ę", "ł", "ń", "ő", "ű", "ṭ", "ḥ", "ā", "ī", "ū",
)
COMBINING = tuple(chr(c) for c in range(0x0300, 0x0370)) + (
    "\u1ab0", "\u1dc0", "\u20d0", "\u20e3", "\u20dd", "\ufe20", "\u0483", "\u0591", "\u05b0", "\u0610",
    "\u064b", "\u0670", "\u093c", "\u094d", "\u0e31", "\u0e48", "\u3099", "\u309a",
)
GREEK = (
    "Ελληνικά", "αλφάβητο", "Καλημέρα κόσμε", "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ", "αβγδεζηθικλμνξοπρστυφχψω", "ς",
    "Ἀθῆναι", "ἐν ἀρχῇ ἦν ὁ λόγος", "φιλοσοφία", "Σωκράτης", "π≈3,14", "μ-λ", "ΐΰ", "ϐϑϒϕϖ", "Ωμέγα",
)
CYRILLIC = (
    "Москва", "Привет, мир!", "съешь же ещё этих мягких французских булок", "ЁЖИК", "ёжик", "Україна",
    "Їжак", "ґанок", "Београд", "Ђорђе", "ѕвезда", "Қазақстан", "Өлгий", "Ӏ", "щ", "ЪЬ", "война и мир",
    "Достоевский", "Ѣ ѣ Ѳ ѳ Ѵ ѵ", "ПРОПИСНЫЕ", "строчные", "СмЕшАнНыЕ",
)
ARABIC = (
    "العربية", "مرحبا بالعالم", "بِسْمِ ٱللَّٰهِ", "السَّلَامُ عَلَيْكُمْ", "كتاب", "ﷺ", "ﻻ", "١٢٣٤٥٦٧٨٩٠",
    "فارسی", "۱۲۳۴", "اردو", "پچژگ", "ـــ", "قُرْآن", "؟", "،", "٪", "القاهرة ٢٠٢٦",
)
HEBREW = (
    "עברית", "שלום עולם", "בְּרֵאשִׁית בָּרָא", "ירושלים", "אבגדהוזחטיכלמנסעפצקרשת", "ךםןףץ", "״", "׳",
    "ישׂראל", "תּוֹרָה", "ﬠ", "ﭏ", "עם 5 ספרים",
)
DEVANAGARI = (
    "हिन्दी", "नमस्ते दुनिया", "संस्कृतम्", "भारत", "क्षत्रिय", "ज्ञान", "०१२३४५६७८९", "ॐ", "।", "॥",
    "मराठी", "नेपाली", "श्री", "द्वार", "ड़", "ढ़", "क़", "हिंदी में लिखा",
)
THAI = (
    "ภาษาไทย", "สวัสดีชาวโลก", "กรุงเทพมหานคร", "ประเทศไทย", "๐๑๒๓๔๕๖๗๘๙", "ๆ", "ฯ", "เด็ก", "น้ำ", "ก่ข้ค๊ง๋",
    "ไม่เป็นไร", "ขอบคุณครับ",
)
CJK = (
    "中文", "你好，世界！", "汉字", "漢字", "人工智能", "数据库", "我爱北京天安门", "龍", "𠀀", "𪚥", "𡨸",
    "日本語", "ひらがな", "カタカナ", "こんにちは世界", "ありがとうございます", "ｶﾀｶﾅ", "ｱｲｳｴｵ", "ー", "ゝゞヽヾ",
    "東京", "大阪", "〜", "「引用」", "『二重』", "【括弧】", "。、", "・", "㍿", "㈱", "々", "〇", "ぁぃぅぇぉ",
    "ガギグゲゴ", "パピプペポ", "がぎぐげご", "か\u3099", "ハ\u309a", "１２３４５", "ＡＢＣｄｅｆ", "！？",
)
HANGUL = (
    "한국어", "안녕하세요 세계", "대한민국", "서울특별시", "ㄱㄴㄷㄹㅁㅂㅅ", "ㅏㅑㅓㅕ", "각", "뷁", "힣", "가",
    "\u1100\u1161\u11a8", "\u1112\u1161\u11ab", "ᄀᄁᄂ", "ᅡᅢᅣ", "ᆨᆩᆪ", "ﾡﾢ", "한글 2026년",
)
EMOJI = (
    "😀", "😂", "🙂", "🤖", "🐍", "🐘", "🚀", "🔥", "💯", "❤", "❤️", "♥️", "☺️", "✅", "❌", "⚠️", "⭐", "🌍",
    "👍", "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿", "👋🏽", "🧑🏿‍💻", "👨‍👩‍👧‍👦", "👩‍❤️‍💋‍👨", "🏳️‍🌈", "🏴‍☠️",
    "🧑‍🚀", "👁️‍🗨️", "🐻‍❄️", "🇺🇸", "🇯🇵", "🇩🇪", "🇫🇷", "🇧🇷", "🇺🇦", "🇪🇺", "🇺🇳",
    "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "#️⃣", "1️⃣", "*️⃣", "©️", "™️", "🅰️",
    "🆗", "🈶", "〰️", "🫠", "🫶🏾", "🪿", "🧌", "\U0001f1e6", "\U0001f3fb", "\ufe0f", "\ufe0e", "☃", "☃️",
)
MATH_AND_SYMBOLS = (
    "∀x∈ℝ: x²≥0", "∑ᵢ aᵢ", "∫₀^∞ e^{-x} dx", "√2 ≈ 1.41421", "α→β", "½ ¼ ¾ ⅓ ⅛", "Ⅻ ⅻ Ⅳ", "²³¹⁰",
    "₀₁₂₃", "①②③", "⑴⑵", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "𝟘𝟙𝟚", "ℕℤℚℝℂ", "℃ ℉ K", "Å", "Ω", "µ", "∞",
    "≠≤≥", "⊂⊃∪∩", "⟨ψ|φ⟩", "→⇒⇔", "♠♣♥♦", "☐☑☒", "⌘⌥⇧", "␀␤", "ʼn", "ℓ", "ᵃᵇᶜ", "ªº",
)
NUMBERS_FIXED = (
    "1,000,000", "3.14159", "1e-9", "12:30", "2026-11-23", "+1 (555) 010-9999", "0", "00", "007", "-42",
    "+42", "1_000_000", "0xDEADBEEF", "0b1010", "0o777", "1.5e+10", "6.022e23", ".5", "5.", "1/2", "3/4",
    "50%", "$19.99", "€1.234,56", "£5", "¥1000", "1.2.3", "v2.0.1", "192.168.0.1", "::1", "fe80::1%eth0",
    "12:30:45.123", "2026-11-23T12:30:00Z", "23/11/2026", "11/23/26", "1st", "2nd", "3rd", "4th", "21st",
    "10k", "5M", "3.5GB", "100ms", "24/7", "9-5", "1-800-FLOWERS", "555-0100", "(555) 010 9999",
    "+44 20 7946 0958", "1 000 000", "1\u00a0000\u00a0000", "1\u202f000", "1'000'000", "12,345.67",
    "١٢٣", "१२३", "๑๒๓", "۱۲۳", "１２３", "Ⅻ", "½", "²", "⑩", "𝟗",
)
CODE = (
    "def f(x):\n    return x + 1\n",
    "class Foo(Bar):\n    def __init__(self, *args, **kwargs):\n        super().__init__(*args, **kwargs)\n",
    "for i in range(10):\n\tprint(f\"{i:03d}\")\n",
    "if __name__ == \"__main__\":\n    main()\n",
    "lambda x: x**2 if x else None",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\n",
    "@dataclass(frozen=True)\nclass P:\n    x: int = 0\n",
    "try:\n    pass\nexcept (ValueError, KeyError) as e:\n    raise RuntimeError('bad') from e\n",
    "SELECT id, token FROM tokens WHERE id = 42;",
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 10) SELECT * FROM t;",
    "CREATE TABLE wte (id int PRIMARY KEY, v vector(768));",
    "INSERT INTO t VALUES ('it''s', E'\\n', $$dollar$$);",
    "SELECT array_agg(x ORDER BY i) FILTER (WHERE x > 0) FROM unnest($1::float4[]) WITH ORDINALITY u(x, i);",
    "-- comment\n/* block */ SELECT 1;",
    "{\"name\": \"gpt2\", \"n_vocab\": 50257, \"ok\": true, \"x\": null, \"f\": -1.5e-3}",
    "[1, 2, 3, {\"a\": [\"b\", \"c\"]}]",
    "{\n  \"key\": \"value\",\n  \"nested\": {\"deep\": [1, 2]}\n}",
    "\"\\u00e9\\n\\t\\\"\"",
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Hi</title></head></html>",
    "<div class=\"a b\" id='x'>Hello &amp; goodbye&nbsp;&lt;3</div>",
    "<a href=\"https://example.com/path?q=1&r=2#frag\">link</a>",
    "<br/><img src=x onerror=alert(1)>",
    "<script>const x = `template ${y}`;</script>",
    "#!/usr/bin/env bash\nset -euo pipefail\n",
    "for f in *.txt; do echo \"$f\"; done",
    "ls -la | grep -v '^d' | awk '{print $9}' > out.txt 2>&1",
    "export PATH=\"$HOME/.local/bin:$PATH\"",
    "docker compose up -d && psql -h 127.0.0.1 -U gpt -c 'select 1'",
    "curl -fsSL https://example.com/install.sh | sh",
    "find . -name '*.py' -exec wc -l {} +",
    "x = a[i:j:k] + b[::-1]",
    "a && b || !c; x ^= y; p->q; ns::f<T>();",
    "fn main() { println!(\"{}\", 1 + 1); }",
    "int main(void) { return 0; }",
    "#include <stdio.h>\n#define MAX(a,b) ((a)>(b)?(a):(b))\n",
    "const f = async (a, b) => { await g(a ?? b); };",
    "x := map[string]int{\"a\": 1}",
    "$ git log --oneline -n 5",
    "    indented_with_four_spaces()\n        eight()\n",
    "\t\ttabbed()\r\n\t}\r\n",
    "key: value\nlist:\n  - a\n  - b\n",
    "[section]\nkey = \"value\"\n",
    "https://user:pass@example.com:8080/a/b?c=d&e=f#g",
    "mailto:someone@example.org",
    "C:\\Users\\name\\file.txt",
    "/usr/local/lib/python3.12/site-packages/",
    "SELECT '<|endoftext|>' AS eot;",
)
WORD_PIECES = (
    "abc123", "x_1", "__init__", "snake_case_2", "camelCase", "PascalCase", "SCREAMING_SNAKE", "kebab-case",
    "a1b2c3", "1abc", "123abc456", "_private", "__dunder__", "x__y", "var_", "_", "__", "___", "a_", "_1",
    "utf8", "utf_8", "UTF-8", "int32_t", "float4", "h2o", "CO2", "B2B", "4chan", "3D", "2fa", "mp3", "i18n",
    "l10n", "k8s", "a11y", "x86_64", "arm64", "Python3", "py311", "GPT2", "gpt_2", "wte_0", "h.0.ln_1.g",
    "c_attn", "n_embd", "__main__", "self._cache", "obj.__dict__", "T1000", "R2D2", "C3PO", "ID_42", "v0_1_2",
)


def _dedupe(strings):
    """Drop duplicates, keep first occurrences in order; enforce the length bound and valid Unicode."""
    out = []
    seen = {}
    for s in strings:
        if not isinstance(s, str):
            raise TypeError(s)
        s = s[:MAX_LEN]
        if s and 0xD800 <= ord(s[-1]) <= 0xDBFF:  # never cut a string into a lone surrogate
            s = s[:-1]
        if s not in seen:
            seen[s] = None
            out.append(s)
    return out


def _ws(rng: random.Random, n_max: int = 4, pool=ASCII_WS) -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(1, n_max)))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(ENGLISH_WORDS) for _ in range(n))


def _case_variants(word: str) -> list[str]:
    mixed = "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(word))
    title = word[:1].upper() + word[1:]
    return [word, word.upper(), title, mixed]


# ---------------------------------------------------------------------------------------- categories


def shakespeare_available() -> bool:
    return SHAKESPEARE.is_file()


def _shakespeare() -> list[str]:
    if not shakespeare_available():
        return []
    text = SHAKESPEARE.read_text(encoding="utf-8")
    rng = random.Random(SEED + 1)
    lines = text.split("\n")
    out = []
    step = max(1, len(lines) // 300)
    for i in range(0, len(lines), step):  # single lines at fixed offsets (the empty line is kept once)
        out.append(lines[i])
    for _ in range(100):  # multi-line chunks, line-aligned
        i = rng.randrange(len(lines))
        out.append("\n".join(lines[i : i + rng.randint(2, 12)]))
    for _ in range(100):  # raw character windows (may start/end mid-word or inside whitespace)
        i = rng.randrange(max(1, len(text) - 10))
        out.append(text[i : i + rng.randint(1, 1500)])
    return out


def _contractions() -> list[str]:
    rng = random.Random(SEED + 2)
    out = []
    for w in CONTRACTION_WORDS:
        out.extend(_case_variants(w))
    stems = ("I", "we", "don", "x", "1", " ", "", "é")
    for stem in stems:
        for suf in CONTRACTION_SUFFIXES:
            for v in _case_variants(stem + suf):
                out.append(v)
    out += ["I'M", "DON'T", "We'Re", "YOU'LL", "they'VE", "He'D", "iT'S", "I'm", "i'M", "CAN'T", "Won'T"]
    for suf in CONTRACTION_SUFFIXES:
        for v in (suf, suf.upper(), suf + " ", " " + suf, suf + suf, "'" + suf, suf + "'", suf * 3,
                  "x" + suf + "x", "x " + suf, "x" + suf + "s", suf + "123", "123" + suf, suf.replace("'", "’"),
                  "don" + suf.replace("'", "’"), suf.replace("'", "''"), "'" + suf.upper()):
            out.append(v)
    for ap in APOSTROPHES:
        out += [ap, ap + ap, ap * 5, ap + "s", "it" + ap + "s", "I" + ap + "m", "don" + ap + "t",
                ap + "hello" + ap, " " + ap + "tis", "rock" + ap + "n" + ap + "roll", "x " + ap + " y",
                ap + " ", " " + ap, "\n" + ap + "ll", ap + "\n", "we" + ap + ap + "re"]
    for _ in range(80):  # contraction-heavy sentences
        parts = []
        for _ in range(rng.randint(2, 8)):
            r = rng.random()
            if r < 0.4:
                w = rng.choice(CONTRACTION_WORDS)
                parts.append(rng.choice(_case_variants(w)))
            elif r < 0.6:
                parts.append(rng.choice(ENGLISH_WORDS) + rng.choice(CONTRACTION_SUFFIXES))
            elif r < 0.7:
                parts.append(rng.choice(APOSTROPHES) + rng.choice(ENGLISH_WORDS))
            else:
                parts.append(rng.choice(ENGLISH_WORDS))
        s = rng.choice(("", " ", "'", "\n")) + " ".join(parts) + rng.choice(("", ".", "'", "' ", "!'", "’"))
        out.append(s)
    return out


def _alnum_underscore() -> list[str]:
    rng = random.Random(SEED + 3)
    out = list(WORD_PIECES)
    for w in WORD_PIECES:
        out += [" " + w, w.upper()]
    alphabet = "abcxyzABCXYZ0123456789_"
    for _ in range(100):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    for _ in range(60):
        out.append(" ".join(rng.choice(WORD_PIECES) for _ in range(rng.randint(2, 6))))
    for _ in range(40):
        out.append("_".join(rng.choice(ENGLISH_WORDS) + str(rng.randint(0, 999)) for _ in range(rng.randint(1, 5))))
    return out


def _numbers() -> list[str]:
    rng = random.Random(SEED + 4)
    out = list(NUMBERS_FIXED)
    for n in NUMBERS_FIXED:
        out += [" " + n, "x" + n + "x"]
    for _ in range(35):
        out.append(f"{rng.randint(0, 10**rng.randint(1, 15)):,}")
        out.append(f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 8)}f}")
        out.append(f"{rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30):e}")
        out.append(f"{rng.randint(1900, 2100)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        out.append(f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}")
        out.append(f"+{rng.randint(1, 99)} ({rng.randint(100, 999)}) {rng.randint(100, 999)}-{rng.randint(0, 9999):04d}")
    for d in range(1, 40):
        out.append("".join(str((i * 7 + d) % 10) for i in range(d)))
    for _ in range(30):
        out.append(" ".join(str(rng.randint(0, 10**6)) for _ in range(rng.randint(2, 10))))
    return out


def _whitespace() -> list[str]:
    rng = random.Random(SEED + 5)
    units = (" ", "\t", "\n", "\r\n")
    out = [""]
    # every combination of up to four whitespace units, whitespace-only
    combos = [""]
    for _ in range(4):
        combos = [c + u for c in combos for u in units]
        out += combos
    for ws in ("\r", "\x0b", "\x0c", " \r", "\r ", "\n\r", "\r\r\n", "\n\n\n\n\n\n\n\n", " " * 50, "\t" * 20,
               "\r\n" * 10, " \t" * 15, " \n" * 15):
        out.append(ws)
    for lead in ("", " ", "  ", "\t", "\n", "\r\n", " \n", "\n ", "   \t\n"):
        for trail in ("", " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n ", "\t \r\n"):
            out.append(lead + "hello world" + trail)
    for _ in range(100):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(ENGLISH_WORDS + ["42", "!", "é", "中", "'s", "x_1"]))
            parts.append(_ws(rng, 6))
        if rng.random() < 0.5:
            parts.insert(0, _ws(rng, 4))
        out.append("".join(parts))
    return out


def _unicode_spaces() -> list[str]:
    rng = random.Random(SEED + 6)
    out = []
    for sp in UNICODE_SPACES:
        out += [sp, sp * 2, sp * 3, "a" + sp + "b", sp + "a", "a" + sp, " " + sp, sp + " ", sp + " a",
                " " + sp + "a", "a" + sp + " b", "1" + sp + "000", sp + "\n", "\n" + sp, sp + "!", "!" + sp + "!"]
    for _ in range(60):
        s = "".join(rng.choice(UNICODE_SPACES + ASCII_WS + ("a", "b", "1", ".", "é")) for _ in range(rng.randint(1, 12)))
        out.append(s)
    return out


def _zero_width_and_control() -> list[str]:
    rng = random.Random(SEED + 7)
    out = []
    for z in ZERO_WIDTH:
        out += [z, z * 3, "a" + z + "b", z + "abc", "abc" + z, " " + z, z + " ", "1" + z + "2", "é" + z,
                "👨" + z + "👩", z + "\n", "don" + z + "'t", "'" + z + "s"]
    for c in CONTROL:
        out += [c, "a" + c + "b", " " + c, c + " ", c * 2, c + "\n"]
    for _ in range(80):
        pool = ZERO_WIDTH + CONTROL + ("a", "b", " ", "1", ".", "\n")
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 10))))
    return out


def _punctuation() -> list[str]:
    rng = random.Random(SEED + 8)
    out = list(PUNCT_CHARS)
    out += ["...", "!!!", "???", "?!", "--", "---", "—", "——", "…", "…!", "(!)", "[...]", "{}", "()", "[]", "<>",
            "->", "=>", "<=", ">=", "!=", "==", "===", "::", ";;", "//", "/*", "*/", "#!", "@@", "$$", "%%", "&&",
            "||", "**", "^^", "~~", "``", "\"\"", "''", "'''", "\"\"\"", ":-)", ";-)", ":(", "¯\\_(ツ)_/¯", "<3",
            "«quoted»", "“quoted”", "‘quoted’", "„quoted“", "‹q›", "¿qué?", "¡hola!"]
    for _ in range(180):
        s = "".join(rng.choice(PUNCT_CHARS) for _ in range(rng.randint(1, 20)))
        if rng.random() < 0.3:
            s = rng.choice((" ", "a", "1", "\n")) + s
        if rng.random() < 0.3:
            s = s + rng.choice((" ", "a", "1", "\n", " x"))
        out.append(s)
    return out


def _accented() -> list[str]:
    rng = random.Random(SEED + 9)
    out = []
    for w in ACCENTED_WORDS:
        out.append(w)
        nfd = unicodedata.normalize("NFD", w)
        out.append(nfd)
        out.append(unicodedata.normalize("NFKC", w))
        out.append(" " + w.upper())
    for _ in range(60):
        out.append(" ".join(rng.choice(ACCENTED_WORDS) for _ in range(rng.randint(2, 6))))
        out.append(unicodedata.normalize("NFD", " ".join(rng.choice(ACCENTED_WORDS) for _ in range(rng.randint(2, 6)))))
    return out


def _script(seed_off: int, words) -> list[str]:
    rng = random.Random(SEED + seed_off)
    out = list(words)
    out += [" " + w for w in words]
    for _ in range(35):
        sep = rng.choice((" ", "", ", ", "\n", ". ", "\u3000" if seed_off == 15 else " "))
        out.append(sep.join(rng.choice(words) for _ in range(rng.randint(2, 7))))
    for _ in range(15):
        out.append(rng.choice(words) + rng.choice((" 123", "42", "!", "?", " abc", "'s", "_x")))
    return out


def _combining() -> list[str]:
    rng = random.Random(SEED + 20)
    out = []
    for i, m in enumerate(COMBINING):
        base = "aeiouAEIOUnxy1 ._"[i % 17]
        out += [base + m] + ([m] if i % 3 == 0 else [])
    for _ in range(100):
        s = ""
        for _ in range(rng.randint(1, 6)):
            s += rng.choice("aeoxZ1 .'") + "".join(rng.choice(COMBINING) for _ in range(rng.randint(0, 5)))
        out.append(s)
    out.append("Z" + "".join(COMBINING[:60]))  # zalgo
    out.append("".join("h" + "\u0336" for _ in range(30)))
    return out


def _emoji() -> list[str]:
    rng = random.Random(SEED + 21)
    out = list(EMOJI)
    for e in EMOJI:
        out += [" " + e, e + e]
    for _ in range(100):
        sep = rng.choice(("", " ", "", "\n", "x"))
        out.append(sep.join(rng.choice(EMOJI) for _ in range(rng.randint(2, 8))))
    out += list(MATH_AND_SYMBOLS) + [" " + m for m in MATH_AND_SYMBOLS]
    return out


def _code() -> list[str]:
    rng = random.Random(SEED + 22)
    out = list(CODE)
    for c in CODE:
        out.append(c.replace("\n", "\r\n"))
        out.append(c.replace("    ", "\t"))
        out.append("  " + c.strip() + "  ")
    for _ in range(80):
        out.append("\n".join(rng.choice(CODE).rstrip("\n") for _ in range(rng.randint(2, 5))))
    return out


def _long_words() -> list[str]:
    rng = random.Random(SEED + 23)
    out = []
    for n in (100, 200, 300, 500, 800, 1200, 1999):
        out.append("a" * n)
        out.append("ab" * (n // 2))
        out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n)))
        out.append("".join(rng.choice("etaoinshrdlu") for _ in range(n)))
        out.append("1" * n)
        out.append("".join(rng.choice("0123456789") for _ in range(n)))
        out.append("!" * n)
        out.append("".join(rng.choice(PUNCT_CHARS) for _ in range(n)))
        out.append(" " * n)
        out.append(("\n" * n))
        out.append("中" * (n // 2))
        out.append("é" * (n // 2))
        out.append("😀" * (n // 4))
        out.append(" " + "x" * (n - 1))
        out.append("_" * n)
    out.append("Pneumonoultramicroscopicsilicovolcanoconiosis")
    out.append("Lopadotemachoselachogaleokranioleipsanodrimhypotrimmatosilphiokarabomelitokatakechymenokichlepikossyphophattoperisteralektryonoptekephalliokigklopeleiolagoiosiraiobaphetraganopterygon")
    out.append("Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft")
    out.append("".join(rng.choice(ENGLISH_WORDS) for _ in range(200))[:MAX_LEN])
    out.append(" ".join(rng.choice(ENGLISH_WORDS) for _ in range(300))[:MAX_LEN])
    for _ in range(30):
        out.append("".join(rng.choice(ENGLISH_WORDS) for _ in range(rng.randint(20, 120)))[:MAX_LEN])
    return out


def _endoftext() -> list[str]:
    rng = random.Random(SEED + 24)
    eot = "<|endoftext|>"
    out = [eot, eot * 2, eot + eot + eot, " " + eot, eot + " ", "\n" + eot + "\n", "a" + eot + "b",
           "<|endoftext|", "|endoftext|>", "<|ENDOFTEXT|>", "< |endoftext| >", "<|startoftext|>", "<|im_start|>",
           "<|endoftext|>Hello", "The end.<|endoftext|>", "'<|endoftext|>'", "\"<|endoftext|>\""]
    for _ in range(100):
        parts = [_words(rng, rng.randint(0, 8)) for _ in range(rng.randint(2, 4))]
        sep = rng.choice((eot, " " + eot + " ", "\n" + eot + "\n", eot + "\n\n", "<|endoftext|>" * 2))
        out.append(sep.join(parts))
    return out


_FRAGMENT_POOLS = (
    ENGLISH_WORDS, CONTRACTION_WORDS, CONTRACTION_SUFFIXES, APOSTROPHES, UNICODE_SPACES, ZERO_WIDTH, ASCII_WS,
    CONTROL, tuple(PUNCT_CHARS), ACCENTED_WORDS, COMBINING, GREEK, CYRILLIC, ARABIC, HEBREW, DEVANAGARI, THAI, CJK,
    HANGUL, EMOJI, MATH_AND_SYMBOLS, NUMBERS_FIXED, CODE, WORD_PIECES, ("<|endoftext|>",),
)


def _mixtures() -> list[str]:
    rng = random.Random(SEED + 25)
    out = []
    joiners = ("", " ", " ", " ", "\n", "\t", "  ", "\u00a0", ", ", ". ", "'", "_", "-")
    for i in range(1400):
        n = rng.randint(1, 12) if i % 10 else rng.randint(20, 60)
        parts = []
        for _ in range(n):
            pool = rng.choice(_FRAGMENT_POOLS)
            frag = rng.choice(pool)
            r = rng.random()
            if r < 0.1:
                frag = frag.upper()
            elif r < 0.15:
                frag = frag[: rng.randint(0, len(frag))]  # a prefix: cuts code points only, never surrogates
            parts.append(frag)
            parts.append(rng.choice(joiners))
        s = "".join(parts)
        if rng.random() < 0.5:
            s = s.rstrip(" ") if rng.random() < 0.5 else s
        out.append(s)
    return out


@lru_cache(maxsize=1)
def _corpus() -> tuple[tuple[str, tuple[str, ...]], ...]:
    builders = (
        ("shakespeare", _shakespeare),
        ("contractions", _contractions),
        ("alnum_underscore", _alnum_underscore),
        ("numbers", _numbers),
        ("whitespace", _whitespace),
        ("unicode_spaces", _unicode_spaces),
        ("zero_width_control", _zero_width_and_control),
        ("punctuation", _punctuation),
        ("accented_latin", _accented),
        ("greek", lambda: _script(10, GREEK)),
        ("cyrillic", lambda: _script(11, CYRILLIC)),
        ("arabic", lambda: _script(12, ARABIC)),
        ("hebrew", lambda: _script(13, HEBREW)),
        ("devanagari", lambda: _script(14, DEVANAGARI)),
        ("thai", lambda: _script(16, THAI)),
        ("cjk_kana", lambda: _script(15, CJK)),
        ("hangul", lambda: _script(17, HANGUL)),
        ("combining_marks", _combining),
        ("emoji_symbols", _emoji),
        ("code", _code),
        ("long_words", _long_words),
        ("endoftext", _endoftext),
        ("mixtures", _mixtures),
    )
    return tuple((name, tuple(_dedupe(build()))) for name, build in builders)


def corpus() -> dict[str, list[str]]:
    """Category name -> strings, in a fixed order; a fresh dict of fresh lists on each call."""
    return {name: list(strings) for name, strings in _corpus()}


def all_strings() -> list[str]:
    """Every string of every category, categories in `corpus()` order (duplicates across categories kept)."""
    return [s for _, strings in _corpus() for s in strings]


if __name__ == "__main__":
    import hashlib

    total = 0
    for name, strings in corpus().items():
        total += len(strings)
        print(f"{name:20s} {len(strings):6d}")
    print(f"{'total':20s} {total:6d}")
    if not shakespeare_available():
        print(f"(shakespeare: {SHAKESPEARE} is absent)")
    digest = hashlib.sha256("\x00".join(all_strings()).encode("utf-8")).hexdigest()
    print(f"sha256 {digest[:16]}")
