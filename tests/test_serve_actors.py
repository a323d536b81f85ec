"""RL actors: 8 processes around one server; one SIGKILLed mid-request is restarted and every prompt's
rollout arrives exactly once, with logprobs, reward and weights versions."""

import os
import signal

import pytest

pytest.importorskip("fastapi")

from gemma.serve import Engine  # noqa: E402
from gemma.serve.actors import Actors  # noqa: E402
from gemma.serve.server import create_app  # noqa: E402
from test_serve_engine import tiny_model  # noqa: E402
from test_serve_http import running  # noqa: E402


def reward(prompt: str, completion: str) -> float:
    return float(len(completion))


def test_actors_survive_a_sigkill(tokenizer_270m):
    with Engine(tiny_model(), tokenizer_270m, max_batch=8, max_len=64, prefill_chunk=16, max_wait_ms=20) as engine:
        engine.warmup()
        with running(create_app(engine, "tiny")) as url:
            prompts = [f"Prompt number {i}:" for i in range(40)]
            with Actors(url, reward, num_actors=8, timeout=60, max_tokens=24, temperature=1.0) as actors:
                ids = actors.put(prompts)
                stream = actors.rollouts(len(prompts), timeout=100)
                got = [next(stream) for _ in range(8)]  # the actors are serving
                busy = {i: r for i, r in actors.inflight.items() if r is not None}
                assert busy, "no actor holds a request"
                victim, lost = next(iter(busy.items()))
                old_pid = actors.pids()[victim]
                os.kill(old_pid, signal.SIGKILL)
                got += list(stream)
                assert actors.restarts == 1 and not actors.failed and actors.pids()[victim] != old_pid
        assert lost in {r.request_id for r in got}  # the killed actor's prompt was re-queued and answered
        assert sorted(r.request_id for r in got) == ids  # each exactly once
        for r in got:
            assert r.prompt == prompts[r.request_id] and r.reward == len(r.completion)
            assert len(r.logprobs) == len(r.tokens) > 0 and all(lp <= 0 for lp in r.logprobs)
            assert r.weights_versions == (0, 0)
        assert engine.metrics.mean_batch > 2  # the actors' requests were batched
