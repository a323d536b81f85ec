"""`python -m gemma generate / chat` end to end on the real 270M."""

import os
import subprocess
import sys

import numpy as np

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gemma", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_generate_continues_like_hf(tokenizer_270m):
    out = run("generate", "The capital of France is", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    ref = np.load(FIXTURES / "gemma3_270m" / "reference.npz")
    hf_text = tokenizer_270m.decode(ref["p0_gen_ids"][:8].tolist())
    assert out.stdout.strip() == ("The capital of France is" + hf_text).strip()


def test_chat_reads_turns_until_eof():
    out = run("chat", "--max-new-tokens", "4", "--system", "Be brief.", stdin="Hello\nThanks\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 3  # two turns, then the prompt that reads EOF


def test_bad_flags_fail_fast():
    out = run("generate", "Hi", "--top-p", "1.5")
    assert out.returncode == 2 and "top_p must be in (0, 1]" in out.stderr
    out = run("generate", "Hi", "--model", "/nonexistent/model.gguf")
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "no such file or directory" in out.stderr
