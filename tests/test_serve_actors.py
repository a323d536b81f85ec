"""RL actors: 8 processes around one server; one SIGKILLed mid-request is restarted and every prompt's
rollout arrives exactly once, with logprobs, reward and weights versions. A reward function that raises, returns
NaN or returns no number: the rollout arrives with reward NaN and its error, counted, and the actor goes on."""

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


def flaky_reward(prompt: str, completion: str) -> float:
    """Raises on prompts ending in 'raise:', gives NaN on 'nan:' and None on 'none:' (no number at all)."""
    if prompt.endswith("raise:"):
        raise ValueError("no verdict for this one")
    if prompt.endswith("nan:"):
        return float("nan")
    if prompt.endswith("none:"):
        return None
    return 1.0


def test_a_failing_reward_arrives_as_nan_with_its_error_and_the_actor_goes_on(tokenizer_270m):
    kinds = ["ok", "raise", "ok", "nan", "none", "ok"] * 3
    with Engine(tiny_model(), tokenizer_270m, max_batch=4, max_len=48, prefill_chunk=16, max_wait_ms=20) as engine:
        engine.warmup()
        with running(create_app(engine, "tiny")) as url:
            prompts = [f"Prompt {i} {kind}:" for i, kind in enumerate(kinds)]
            with Actors(url, flaky_reward, num_actors=2, timeout=60, max_tokens=4, temperature=1.0) as actors:
                ids = actors.put(prompts)
                got = sorted(actors.rollouts(len(prompts), timeout=100), key=lambda r: r.request_id)
                assert actors.reward_errors == 9 and actors.restarts == 0 and not actors.failed
                assert {r.actor for r in got} == {0, 1}  # both actors kept going
    assert [r.request_id for r in got] == ids  # each exactly once
    for r, kind in zip(got, kinds):
        if kind == "ok":
            assert r.reward == 1.0 and r.error is None
        else:
            assert r.reward != r.reward and r.error  # NaN
            want = {"raise": "raised ValueError: no verdict", "nan": "returned nan, not a finite number",
                    "none": "raised TypeError"}[kind]
            assert want in r.error, r.error
        assert len(r.tokens) > 0
