"""The server under load (tiny model, 16 slots): continuous batching seen in /metrics, 300 requests from
32 clients with some cancelled mid-stream, a client leaving frees its slot within one step, and a weight
update under load (versions reported, nothing started after it runs on the old weights, staleness)."""

import concurrent.futures as cf
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from gemma.sampler import Sampler  # noqa: E402
from gemma.serve import Engine  # noqa: E402
from gemma.serve.metrics import parse  # noqa: E402
from gemma.serve.server import create_app  # noqa: E402
from test_serve_engine import tiny_model  # noqa: E402
from test_serve_http import running  # noqa: E402

SLOTS, MAX_LEN = 16, 96


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def new_weights():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def engine(tiny, tokenizer_270m):
    with Engine(tiny, tokenizer_270m, max_batch=SLOTS, max_len=MAX_LEN, prefill_chunk=16, max_wait_ms=20) as e:
        e.warmup()
        yield e


@pytest.fixture(scope="module")
def url(engine, new_weights):
    with running(create_app(engine, "tiny", load_weights=lambda path: new_weights)) as u:
        yield u


def ids(rng, n):
    return rng.integers(3, 256, size=n).tolist()


def batch_stats(url):
    m = parse(httpx.get(url + "/metrics", timeout=10).text)
    return m["gemma_running_batch_size_sum"], m["gemma_running_batch_size_count"]


def idle(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while (engine.running or engine._queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not engine.running


def test_sixteen_clients_batch_together(url, engine):
    """16 concurrent openai clients, 2 requests each: the mean running batch read from /metrics is >= 8."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    rng = np.random.default_rng(1)
    work = [[ids(rng, int(rng.integers(4, 20))) for _ in range(2)] for _ in range(16)]
    barrier = threading.Barrier(16)
    sum0, count0 = batch_stats(url)

    def client_run(prompts):
        barrier.wait(30)
        return [client.completions.create(model="tiny", prompt=p, max_tokens=40, temperature=0).usage
                .completion_tokens for p in prompts]

    with cf.ThreadPoolExecutor(16) as pool:
        made = sum(sum(r) for r in pool.map(client_run, work))
    sum1, count1 = batch_stats(url)
    mean = (sum1 - sum0) / (count1 - count0)
    assert made > 0 and mean >= 8, f"mean running batch {mean:.2f} over {count1 - count0} steps"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_three_hundred_requests_from_32_clients(url, engine):
    """Random lengths, plain and streamed, every tenth streamed request dropped after two chunks: each is
    answered exactly once (one 200 body, or one finish and one [DONE] per stream) or cancelled, no server
    error, the engine counts 300 ends, and RSS grows by at most 40 MiB over the last 200."""
    rng = np.random.default_rng(2)
    specs = [dict(prompt=ids(rng, int(rng.integers(1, 40))), max_tokens=int(rng.integers(1, 25)),
                  temperature=float(i % 2), seed=i, stream=i % 3 == 0, drop=i % 10 == 0) for i in range(300)]
    for s in specs:
        if s["drop"]:
            s.update(stream=True, max_tokens=50)
    before = dict(engine.metrics.requests)
    http = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64))

    def one(spec):
        body = {k: spec[k] for k in ("prompt", "max_tokens", "temperature", "seed", "stream")}
        if not spec["stream"]:
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            out = r.json()
            assert len(out["choices"]) == 1 and out["choices"][0]["finish_reason"] in ("stop", "length")
            assert out["usage"]["completion_tokens"] <= spec["max_tokens"]
            return out["id"], "answered"
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = []
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if spec["drop"] and len(lines) == 2:
                    return json.loads(lines[0][6:])["id"], "dropped"
        assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert len({c["id"] for c in chunks}) == 1
        assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks if c["choices"]) == 1
        return chunks[0]["id"], "answered"

    with cf.ThreadPoolExecutor(32) as pool:
        first = list(pool.map(one, specs[:100]))
        assert idle(engine)
        rss = rss_bytes()
        rest = list(pool.map(one, specs[100:]))
    http.close()
    assert idle(engine)
    grown = rss_bytes() - rss
    results = first + rest
    assert len({rid for rid, _ in results}) == 300  # one response id per request
    after = engine.metrics.requests
    ends = {k: after[k] - before.get(k, 0) for k in after}
    assert sum(ends.values()) == 300 and ends.get("error", 0) == 0, ends
    assert 1 <= ends.get("cancelled", 0) <= sum(s["drop"] for s in specs), ends
    assert grown < 40 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over the last 200 requests"


def test_a_client_leaving_frees_its_slot_within_one_step(url, engine):
    assert idle(engine)
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 80,
                                                              "stream": True, "temperature": 1.0},
                      timeout=60) as r:
        lines = r.iter_lines()
        next(lines), next(lines)
        gen = next(s.gen for s in engine._slots if s is not None)
        left = time.monotonic()
    deadline = left + 10
    while not gen.cancelled and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gen.cancelled, "the server did not notice the client leave"
    steps, tokens = engine.metrics.steps, len(gen.choices[0].tokens)
    gen.wait(10)
    assert gen.choices[0].finish_reason == "cancelled" and engine.running == 0
    assert engine.metrics.steps - steps <= 1 and len(gen.choices[0].tokens) - tokens <= 1
    assert time.monotonic() - left < 5


def test_weight_update_under_load(url, engine, tokenizer_270m, new_weights):
    """8 streams run while /v1/weights swaps weights in: they report (old, new); every request sent after
    the update answered runs wholly on the new weights (greedy text equals the new model's); a request
    made against a version older than --max-staleness allows gets 409."""
    assert idle(engine)
    old = engine.weights_version
    rng = np.random.default_rng(3)
    http = httpx.Client(base_url=url, timeout=120)
    streams, started = [], threading.Barrier(9)

    def stream(prompt):
        body = {"prompt": prompt, "max_tokens": 85, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as r:
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 1:
                        started.wait(60)
            return chunks

    with cf.ThreadPoolExecutor(12) as pool:
        running_ = [pool.submit(stream, ids(rng, 5)) for _ in range(8)]
        started.wait(60)  # every stream has its first token
        r = http.post("/v1/weights", json={"path": "new", "version": old + 1})
        assert r.status_code == 200 and r.json()["weights_version"] == old + 1
        prompts = [ids(rng, int(rng.integers(3, 12))) for _ in range(4)]
        later = list(pool.map(lambda p: http.post("/v1/completions", json={"prompt": p, "max_tokens": 8,
                                                                           "temperature": 0}).json(), prompts))
        streams = [f.result(120) for f in running_]
    sampler = Sampler(new_weights, tokenizer_270m, max_len=MAX_LEN, prefill_chunk=16)
    for p, out in zip(prompts, later):
        assert out["choices"][0]["weights_versions"] == [old + 1, old + 1] and out["weights_version"] == old + 1
        assert out["choices"][0]["text"] == sampler.generate(p, max_new_tokens=8).text
    spans = []
    for chunks in streams:
        versions = [c["weights_version"] for c in chunks if c["choices"][0]["finish_reason"] is None]
        assert versions[0] == old and versions == sorted(versions) and set(versions) <= {old, old + 1}
        spans.append(chunks[-1]["choices"][0]["weights_versions"])
        assert spans[-1][0] == old and spans[-1][1] >= versions[-1]
    assert [old, old + 1] in spans  # some streams ran across the update

    engine.max_staleness = 0
    try:
        r = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "weights_version": old})
        assert r.status_code == 409 and r.json()["error"]["param"] == "weights_version"
        assert f"version {old}; the server is at {old + 1}" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "weights_version": old + 1})
        assert r.status_code == 200
    finally:
        engine.max_staleness = None
        http.close()
