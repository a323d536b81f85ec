"""`python -m gemma finetune`: bad input exits 2 with one line before the weights load, writing nothing;
a tiny run end to end through the command line."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
from gemma import config
from gemma.__main__ import main
from gemma.train import export
from gemma.transformer import Transformer

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_270m):
    """A tiny random model with the real tokenizer, saved as our orbax checkpoint."""
    path = tmp_path_factory.mktemp("tiny_model")
    model = Transformer(config.tiny(vocab_size=262_144, d_model=32, hidden_dim=64, head_dim=8), rngs=nnx.Rngs(0))
    return checkpoints.save(model, path, tokenizer=tokenizer_270m)


def _jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _fails(monkeypatch, capsys, argv, match):
    loaded = []
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded"))
    assert main(["finetune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    import re
    assert re.search(match, err), err
    assert not loaded


def test_bad_data_files(tmp_path, monkeypatch, capsys, tiny_dir):
    out = tmp_path / "out"
    base = ["--model", tiny_dir, "--output", str(out), "--steps", "2"]
    cases = [
        ([GOOD, "{not json"], r"bad\.jsonl:2"),
        ([{"messages": [{"role": "robot", "content": "x"}, {"role": "model", "content": "y"}]}], r"robot"),
        ([{"prompt": "a", "response": "b", "extra": 1}], r"extra"),
        ([{"prompt": "a", "response": ""}], r"empty"),
        ([], r"empty|no examples"),
    ]
    for lines, match in cases:
        _fails(monkeypatch, capsys, [*base, "--data", _jsonl(tmp_path / "bad.jsonl", lines)], match)
    long = _jsonl(tmp_path / "long.jsonl", [GOOD, {"text": "word " * 200}])
    _fails(monkeypatch, capsys, [*base, "--data", long, "--seq-len", "32", "--long", "error"], r"long\.jsonl:2")
    assert not out.exists()


def test_bad_settings(tmp_path, monkeypatch, capsys, tiny_dir):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD])
    base = ["--model", tiny_dir, "--data", data, "--output", str(tmp_path / "out")]
    _fails(monkeypatch, capsys, [*base, "--steps", "0"], r"--steps must be >= 1")
    _fails(monkeypatch, capsys, [*base, "--learning-rate=-1e-4"], r"learning_rate must be > 0")
    _fails(monkeypatch, capsys, [*base, "--lora-rank", "4", "--lora-targets", "q,embed"], r"unknown LoRA target.*embed")
    _fails(monkeypatch, capsys, [*base, "--mesh", "data=2,fsdp=3"], r"needs 6 devices but there are 1")
    _fails(monkeypatch, capsys, [*base, "--mesh", "pipeline=2"], r"unknown axis 'pipeline'")
    _fails(monkeypatch, capsys, ["--model", str(tmp_path / "nowhere"), "--data", data, "--output",
                                 str(tmp_path / "out")], r"no such file or directory")
    assert not (tmp_path / "out").exists()


def test_end_to_end_then_refuses_another_run_in_the_same_dir(tmp_path, tiny_dir, monkeypatch, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD, {"prompt": "2 + 2?", "response": "4"}, {"text": "Some text."}])
    out = tmp_path / "run"
    argv = ["finetune", "--model", tiny_dir, "--data", data, "--eval-data", data, "--output", str(out),
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--lora-rank", "2", "--eval-every", "2"]
    r = subprocess.run([sys.executable, "-m", "gemma", *argv], capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 2, 3]
    model = checkpoints.load(out)
    assert model.config == checkpoints.load(tiny_dir).config
    assert checkpoints.load_tokenizer(out).encode("Hi") == checkpoints.load_tokenizer(tiny_dir).encode("Hi")
    adapted = export.load_peft(checkpoints.load(tiny_dir), out / "adapter")  # the PEFT copy of the adapters
    tokens = jnp.asarray([[2, 10, 20, 30, 40]])
    assert float(jnp.abs(adapted(tokens) - checkpoints.load(tiny_dir)(tokens)).max()) > 0  # trained: b != 0
    np.testing.assert_allclose(adapted(tokens), model(tokens), rtol=0, atol=1e-5)  # base + adapters == merged
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    _fails(monkeypatch, capsys, argv[1:-4] + ["--lora-rank", "4"], r"holds another run")
    _fails(monkeypatch, capsys, [a if a != tiny_dir else "gemma3-270m" for a in argv[1:]], r"holds another run")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
