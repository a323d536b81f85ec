"""`python -m gemma generate / chat` end to end on the real 270M: output, a chat driven through a
pseudo-terminal (Ctrl-C, commands, full context), and every bad input refused before the weights load."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is"


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "gemma", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_generate_continues_like_hf(tokenizer_270m):
    out = run("generate", PROMPT, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    ref = np.load(FIXTURES / "gemma3_270m" / "reference.npz")
    hf_text = tokenizer_270m.decode(ref["p0_gen_ids"][:8].tolist())
    assert out.stdout.strip() == (PROMPT + hf_text).strip()


def test_generate_stop_and_verbose():
    out = run("generate", PROMPT, "--max-new-tokens", "16", "--stop", "country", "--stop", "never", "-v")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PROMPT + " the capital of the \n"  # greedy: " the capital of the country of France."
    assert "[loaded gemma3-270m (gguf, float32) in " in out.stderr and "[first token " in out.stderr


def test_chat_reads_turns_until_quit():
    out = run("chat", "--max-new-tokens", "4", "--system", "Be brief.", stdin="Hello\n\n/help\nThanks\n/quit\nunread\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("> ") == 5  # two turns, the empty line, /help, /quit; "unread" is never read
    assert "/reset" in out.stderr and "Traceback" not in out.stderr


def test_chat_through_a_terminal():
    """Ctrl-C mid-reply stops it and keeps the dialog (the next turn adds to it); /help, /reset; a full
    dialog gets the message; Ctrl-C at the prompt leaves with status 0; never a traceback."""
    import pexpect  # in the test extra: this test must not be skipped quietly
    child = pexpect.spawn(sys.executable, ["-m", "gemma", "chat", "--max-len", "300", "--max-new-tokens", "100", "-v"],
                          cwd=ROOT, encoding="utf-8", timeout=120, dimensions=(40, 200))
    child.logfile_read = log = io.StringIO()
    try:
        child.expect_exact("> ")
        child.sendline("/help")
        child.expect_exact("/reset")
        child.expect_exact("> ")
        sizes = []
        for message in ("Tell me a story about a dragon.", "Go on."):
            child.sendline(message)
            child.expect_exact(message + "\r\n")
            child.expect(r"\S")  # the reply has started
            child.sendintr()
            child.expect_exact("[reply stopped]")
            child.expect(r"the dialog holds (\d+) of 300 tokens")
            sizes.append(int(child.match.group(1)))
            child.expect_exact("> ")
        assert sizes[1] > sizes[0] > 0  # the second turn was added to the first, not a new dialog
        child.sendline("word " * 200)
        child.expect_exact("[the dialog is full: ")
        child.expect_exact("/reset starts over")
        child.expect_exact("> ")
        child.sendline("/reset")
        child.expect_exact("[dialog reset]")
        child.expect_exact("> ")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0 and "Traceback" not in log.getvalue()


def test_sampling_flags():
    from gemma.__main__ import _parser, _sampling

    parse = lambda *a: _sampling(_parser().parse_args(["generate", "x", *a]))
    assert parse()["temperature"] == 0.0
    assert parse("--top-k", "5")["temperature"] == parse("--top-p", "0.9")["temperature"] == 1.0  # as do_sample
    assert parse("--top-k", "5", "--temperature", "0.5")["temperature"] == 0.5
    assert parse("--stop", "a", "--stop", "b")["stop"] == ["a", "b"]
    assert "(default: 64)" in _parser()._subparsers._group_actions[0].choices["generate"].format_help()


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("gemma3-jax ") and "jax" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "the prompt is empty"),
    (["generate", "word " * 60, "--max-len", "100"], "the prompt is 62 tokens; with --max-new-tokens 64 that is "
                                                      "126, over --max-len 100"),
    (["generate", "Hi", "--max-len", "50000"], "--max-len 50000 is over the model's context of 32768 tokens"),
    (["generate", "Hi", "--max-len", "0"], "--max-len must be >= 1"),
    (["generate", "Hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "Hi", "--top-k", "0"], "--top-k must be >= 1"),
    (["generate", "Hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["chat", "--max-len", "40000"], "--max-len 40000 is over the model's context"),
], ids=["empty", "too-long", "max-len-over-context", "max-len-0", "top-p", "top-k", "temperature", "max-new-0",
        "chat-max-len"])
def test_bad_input_exits_2_before_loading(args, message):
    out = run(*args)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error: {out.stderr[7:]}" and out.stderr.count("\n") == 1  # one line
    assert message in out.stderr and "word word" not in out.stderr  # the prompt is not echoed
    assert "loading" not in out.stderr and out.stdout == ""  # the weights were never read


def test_missing_model_is_one_line():
    out = run("generate", "Hi", "--model", "/nonexistent/model.gguf")
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "no such file or directory" in out.stderr
    assert out.stderr.count("\n") == 1


def test_quantized_speculative_generate_prints_the_plain_text():
    """--quantize int4 --speculative (each draft) prints the text plain int4 streams, greedy; -v says
    how many drafted tokens were kept."""
    args = ("generate", PROMPT, "--max-new-tokens", "24", "--quantize", "int4")
    plain = run(*args)
    assert plain.returncode == 0, plain.stderr
    for draft in ("lookup", "vocab", "hybrid"):
        out = run(*args, "--speculative", draft, "-v")
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain.stdout and len(out.stdout) > len(PROMPT) + 20
        assert "[loaded gemma3-270m (gguf, int4, the rest float32) in " in out.stderr
        assert " drafted tokens kept]" in out.stderr
    text = plain.stdout[len(PROMPT):-1]
    stop = text[8:14]
    stopped = run(*args, "--speculative", "vocab", "--stop", stop)
    assert stopped.returncode == 0 and stopped.stdout == PROMPT + text[:text.index(stop)] + "\n"
