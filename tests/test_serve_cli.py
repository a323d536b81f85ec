"""`python -m gemma serve` as users run it: flags checked before loading, then a real process on a
free port answering the openai client; --api-key; stopped with SIGINT."""

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_serve_engine import tiny_model  # noqa: E402


def serve(*flags, **kw):
    return subprocess.Popen([sys.executable, "-m", "gemma", "serve", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("flags,words", [
    (["--max-batch", "0"], "--max-batch must be >= 1"), (["--port", "70000"], "--port must be in"),
    (["--max-wait-ms", "-1"], "--max-wait-ms must be >= 0"), (["--max-len", "1"], "--max-len must be >= 2"),
    (["--api-key", ""], "--api-key needs"),
])
def test_bad_flags_exit_2_before_loading(flags, words):
    p = serve("--model", "/nonexistent", *flags)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and words in err and len(err.strip().splitlines()) == 1


def test_serve_process(tmp_path, tokenizer_270m):
    import checkpoints

    checkpoints.save(tiny_model(), str(tmp_path / "tiny"), tokenizer_270m)
    env = dict(os.environ, GEMMA_CACHE=str(tmp_path / "cache"))
    p = serve("--model", str(tmp_path / "tiny"), "--port", "0", "--max-batch", "2", "--max-len", "64",
              "--api-key", "k", "--no-warmup", env=env)
    try:
        deadline, url, lines = time.monotonic() + 120, None, []
        while url is None:
            assert time.monotonic() < deadline and p.poll() is None, "".join(lines) + (p.stderr.read() or "")
            line = p.stderr.readline()
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        while True:  # uvicorn binds just after the line
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", timeout=60, max_retries=0)
        r = client.completions.create(model=str(tmp_path / "tiny"), prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3 and r.to_dict()["weights_version"] == 0
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        with pytest.raises(openai.BadRequestError, match="max_len of 64"):
            client.completions.create(model="x", prompt="Hello", max_tokens=100)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
