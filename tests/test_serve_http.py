"""The OpenAI-compatible server through the official `openai` client and raw HTTP: completions, chat,
streaming, stops, seeds, logprobs, metrics, API key, each bad request, a client leaving mid-stream."""

import contextlib
import json
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from gemma.chat import format_dialog  # noqa: E402
from gemma.sampler import Sampler  # noqa: E402
from gemma.serve import Engine  # noqa: E402
from gemma.serve.metrics import parse  # noqa: E402
from gemma.serve.server import create_app  # noqa: E402
from test_serve_engine import tiny_model  # noqa: E402

MAX_LEN = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """`app` under uvicorn on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def engine(tiny, tokenizer_270m):
    with Engine(tiny, tokenizer_270m, max_batch=4, max_len=MAX_LEN, prefill_chunk=8, max_wait_ms=2) as e:
        yield e


@pytest.fixture(scope="module")
def sampler(tiny, tokenizer_270m):
    return Sampler(tiny, tokenizer_270m, max_len=MAX_LEN, prefill_chunk=8)


@pytest.fixture(scope="module")
def new_weights():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def url(engine, new_weights):
    with running(create_app(engine, "tiny", load_weights=lambda path: new_weights)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_completions_equal_sampler(client, sampler):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    want = sampler.generate("The capital of France is", max_new_tokens=8)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(sampler.encode_prompt("The capital of France is"))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    body = r.to_dict()
    assert isinstance(body["weights_version"], int) and body["choices"][0]["weights_versions"][1] == \
        body["weights_version"]
    r = client.completions.create(model="tiny", prompt=["Hello", "One two"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == sampler.generate("Hello", max_new_tokens=5).text
    assert r.choices[2].text == sampler.generate("One two", max_new_tokens=5).text


def test_staggered_clients_equal_sampler(client, sampler):
    """Concurrent requests of different lengths arriving at different times: each equals Sampler.generate."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (3, 21, 9, 14, 30, 5)]
    got = [None] * len(prompts)

    def call(i):
        time.sleep(0.05 * i)
        got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=6, temperature=0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for p, r in zip(prompts, got):
        assert r.choices[0].text == sampler.generate(p, max_new_tokens=6).text


def test_chat_uses_the_gemma_template(client, sampler):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, temperature=0)
    prompt = format_dialog([("user", "Hi"), ("model", "Hello!"), ("user", "Name a colour.")], "Be brief.")
    want = sampler.generate(prompt, max_new_tokens=7)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(sampler.encode_prompt(prompt))
    assert r.object == "chat.completion" and "weights_version" in r.to_dict()


def test_streaming(client, url):
    kw = dict(model="tiny", max_tokens=10, temperature=0)
    whole = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all("weights_version" in c.to_dict() for c in chunks)
    messages = [{"role": "user", "content": "Say hi"}]
    whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 10
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_seed_logprobs(client, sampler):
    full = sampler.generate("1, 2, 3,", max_new_tokens=12).text
    stop = full[len(full) // 2:][:2]
    r = client.completions.create(model="tiny", prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == sampler.generate("1, 2, 3,", max_new_tokens=12, stop=[stop]).text
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    kw = dict(model="tiny", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=3, **kw).choices[0].text
    assert client.completions.create(seed=3, **kw).choices[0].text == a
    assert client.completions.create(seed=4, **kw).choices[0].text != a
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text and all(len(t) == 2 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0
    r = client.completions.create(model="tiny", prompt="Once", max_tokens=3, temperature=1,
                                  extra_body={"top_k": 1})
    assert r.choices[0].text == sampler.generate("Once", max_new_tokens=3).text  # top_k 1 is greedy


def test_models_health_metrics(url, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = httpx.get(url + "/health", timeout=10).json()
    assert health["status"] == "ok" and "weights_version" in health
    r = httpx.get(url + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    m = parse(r.text)
    for name in ("gemma_requests_queued", "gemma_requests_running", "gemma_generation_tokens_per_second",
                 "gemma_running_batch_size_count", "gemma_running_batch_size_sum",
                 'gemma_running_batch_size_bucket{le="+Inf"}'):
        assert name in m, name
    assert m["gemma_running_batch_size_count"] > 0 and m["gemma_generation_tokens_total"] > 0


BAD = [  # body, status, param, words in the message
    ("{not json", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ({"prompt": 5}, 400, "prompt", "'prompt' must be"),
    ({"prompt": "Hi", "max_tokens": "x"}, 400, "max_tokens", "'max_tokens' must be"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "Hi", "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature", "'temperature' must be"),
    ({"prompt": "Hi", "top_p": "x"}, 400, "top_p", "'top_p' must be"),
    ({"prompt": "Hi", "seed": 1.5}, 400, "seed", "'seed' must be"),
    ({"prompt": "Hi", "stream": "yes"}, 400, "stream", "'stream' must be"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "Hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "Hi", "n": 5}, 400, "n", "--max-batch (4)"),
    ({"prompt": "Hi", "n": True}, 400, "n", "'n' must be"),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop", "'stop' must be"),
    ({"prompt": "Hi", "logprobs": 9}, 400, "logprobs", "[0, 5]"),
    ({"prompt": [2] * 100, "max_tokens": 29}, 400, "max_tokens", f"max_len of {MAX_LEN}"),
    ({"prompt": [10**7]}, 400, "prompt", "vocabulary"),
    ({"prompt": ""}, 400, "prompt", "empty"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(b[0])[:30] for b in BAD])
def test_bad_completion_requests(url, body, status, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/completions", content=content, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    ok = httpx.post(url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)  # still serving
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_chat_over_max_len_names_the_limit(url):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 60}],
                                                        "max_tokens": 100}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert f"max_len of {MAX_LEN}" in r.json()["error"]["message"]


@pytest.mark.parametrize("messages,words", [
    ("hi", "non-empty list"), ([{"role": "bot", "content": "x"}], "role must be"),
    ([{"role": "assistant", "content": "x"}], "must end with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'assistant' was expected"),
    ([{"role": "user", "content": 3}], "content must be"),
])
def test_bad_chat_requests(url, client, messages, words):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and words in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):  # the client sees an API error; the server keeps serving
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=1).choices[0].text is not None


def test_client_leaving_mid_stream_frees_its_slot(url, engine):
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Once", "max_tokens": 100, "stream": True,
                                                              "temperature": 1.0}, timeout=60) as r:
        for i, line in enumerate(r.iter_lines()):
            if i >= 3:
                break
    deadline = time.monotonic() + 15
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.running == 0
    assert engine.metrics.requests["cancelled"] >= 1


def test_api_key(engine):
    with running(create_app(engine, "tiny", api_key="sekrit")) as u:
        assert httpx.get(u + "/v1/models", timeout=10).status_code == 401
        r = httpx.post(u + "/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer nope"},
                       timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=u + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=u + "/v1", api_key="sekrit", max_retries=0, timeout=60)
        assert good.completions.create(model="tiny", prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(u + "/health", timeout=10).status_code == 200


def test_weight_update_endpoint(engine, url, client, tokenizer_270m, new_weights):
    from fastapi.testclient import TestClient

    remote = TestClient(create_app(engine, "tiny", load_weights=lambda path: new_weights))  # host "testclient"
    r = remote.post("/v1/weights", json={"path": "x", "version": 1})
    assert r.status_code == 403 and "local callers only" in r.json()["error"]["message"]
    version = engine.weights_version + 1
    assert httpx.post(url + "/v1/weights", json={"path": "x", "version": version - 1}, timeout=30).status_code == 400
    r = httpx.post(url + "/v1/weights", json={"path": "new", "version": version}, timeout=60)
    assert r.status_code == 200 and r.json()["weights_version"] == version
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert out.to_dict()["weights_version"] == version
    want = Sampler(new_weights, tokenizer_270m, max_len=MAX_LEN, prefill_chunk=8).generate("Hello", max_new_tokens=5)
    assert out.choices[0].text == want.text
