"""The RL trainer on tiny models built here: per-token logprobs, rollouts through the engine, the baselines, KL,
GKD, bad inputs, the run directory (SIGKILL and resume to the bit), the command line, and the acceptance
experiments of issue 19 on benchmarks/distill_onpolicy.py's permutation task (tests/rl_task.py)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import checkpoints
import rl_task as RT
from gemma.train import rl_run
from gemma.train import rl_trainer as RLT
from gemma.train import trainer as T

WORKER = os.path.join(os.path.dirname(__file__), "rl_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for this module's trainers and the processes it starts: a program already
    compiled (the engine's, the scoring pass, a step of the same settings) is loaded instead of compiled again.
    Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path_factory.mktemp("xla"))
    settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _cache_env(path):
    """The environment of a subprocess that shares the module's compilation cache."""
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_logprobs_match_log_softmax(softcap):
    rng = np.random.default_rng(0)
    h, e = rng.normal(size=(2, 5, 8)).astype(np.float32), rng.normal(size=(37, 8)).astype(np.float32)
    t = rng.integers(0, 37, (2, 5))
    g = rng.normal(size=(2, 5)).astype(np.float32)

    def plain(h, e):
        logits = jnp.einsum("btd,vd->btv", h, e)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(t)[..., None], -1)[..., 0]

    chunked = lambda h, e: RLT.token_logprobs(h, e, jnp.asarray(t), chunk_size=16, softcap=softcap)  # noqa: E731
    np.testing.assert_allclose(chunked(h, e), plain(h, e), rtol=1e-5, atol=1e-6)
    want = jax.grad(lambda h, e: jnp.sum(g * plain(h, e)), argnums=(0, 1))(h, e)
    got = jax.jit(jax.grad(lambda h, e: jnp.sum(g * chunked(h, e)), argnums=(0, 1)))(h, e)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(kl_alpha=-0.1), "kl_alpha .* must be a finite number >= 0, got -0.1"),
    (dict(kl_alpha=float("nan")), "kl_alpha"),
    (dict(samples_per_prompt=1), "group baseline .* needs samples_per_prompt >= 2, got 1"),
    (dict(samples_per_prompt=0, baseline="value"), "samples_per_prompt must be an int >= 1"),
    (dict(baseline="critic"), "baseline must be one of group, value"),
    (dict(kl_estimator="k1"), "kl_estimator must be one of exact, k3"),
    (dict(gkd_weight=1.5), r"gkd_weight must be a number in \[0, 1\]"),
    (dict(gkd_beta=2.0), "gkd_beta"),
    (dict(rollout_lag=2, max_staleness=1), "every rollout would be dropped"),
    (dict(max_ratio=0.0), "max_ratio"),
    (dict(stop_ids=()), "stop_ids"),
])
def test_config_bad_inputs(kw, match):
    with pytest.raises(ValueError, match=match):
        RLT.RLConfig(**kw)


def test_value_baseline_allows_one_sample():
    assert RLT.RLConfig(samples_per_prompt=1, baseline="value").samples_per_prompt == 1


def test_prompt_iterator_epochs_and_state():
    it = RLT.PromptIterator(5, 3, seed=1)
    first = [it.next() for _ in range(5)]  # 15 draws: 3 epochs, each a permutation
    flat = sum(first, [])
    for e in range(3):
        assert sorted(flat[5 * e:5 * e + 5]) == list(range(5))
    it2 = RLT.PromptIterator(5, 3, seed=1)
    it2.next()
    state = it2.get_state()
    it3 = RLT.PromptIterator(5, 3, seed=1)
    it3.set_state(state)
    assert [it3.next() for _ in range(4)] == first[1:]


def test_reward_hacking_monitor():
    honest = [{"step": s, "eval_reward": 0.5 + 0.1 * s, "eval_metric": 0.3 + 0.1 * s} for s in range(5)]
    assert RLT.reward_hacking(honest) is None
    hacked = [{"step": s, "eval_reward": 0.5 + 0.1 * s, "eval_metric": [0.3, 0.4, 0.36, 0.2, 0.1][s]}
              for s in range(5)]
    assert RLT.reward_hacking(hacked) == 3  # reward up 0.3, metric 0.2 below its best (0.4)
    assert RLT.reward_hacking(hacked, margin=0.25) == 4
    assert RLT.reward_hacking([{"step": 1, "eval_reward": 1.0}]) is None  # no metric: nothing to compare


# ---------------------------------------------------------------- the trainer on the permutation task


@pytest.fixture(scope="module")
def task():
    return RT.Task(n=3, digits=6, seed=0)


def _trainer(task, seed=0, *, reward=RT.dense, prompts=8, batch=4, steps=4, lr=3e-3, **rl_kw):
    policy = RT.B.make_model(task, RT.SIZE, seed)
    rng = np.random.default_rng([seed, 7])
    cfg = T.TrainConfig(steps=steps, batch_size=batch, seq_len=task.seq_len, learning_rate=lr, seed=seed)
    rc = RLT.RLConfig(**{"samples_per_prompt": 4, "max_new_tokens": task.n + 1,
                         "stop_ids": (task.tok.end_of_turn_id,), **rl_kw})
    return RLT.RLTrainer(policy, task.tok, RT.pairs(task.prompts("train", prompts, rng)), cfg, rc, reward,
                         metric=RT.valid)


def test_on_policy_steps_through_the_engine(task):
    tr = _trainer(task, kl_alpha=0.1)
    try:
        before = jax.tree.map(np.array, tr.trainable)
        m = tr.step()
        assert tr.step_count == 1 and tr.engine.weights_version == 1
        assert m["version"] == 0 and m["staleness"] == 0 and m["reward_dropped"] == 0
        assert m["log_ratio"] < 1e-4  # the engine's logprobs are the learner's (f32, the same weights)
        assert m["kl"] == 0.0 or m["kl"] < 1e-6  # the policy is the reference before its first step
        assert 1 <= m["distinct"] <= 4 and 0 < m["length"] <= task.n + 1
        assert {"reward", "penalized_reward", "kl", "metric", "length", "distinct", "truncated", "loss",
                "grad_norm", "learning_rate", "stale_dropped"} <= set(m)
        changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(tr.trainable))]
        assert any(changed)
        m2 = tr.step()
        assert m2["version"] == 1 and m2["log_ratio"] < 1e-4 and m2["kl"] > 0  # on the new weights, moved
        ev = tr.evaluate(RT.pairs(task.prompts("heldout", 6, np.random.default_rng(3))))
        assert set(ev) == {"eval_reward", "eval_metric", "eval_length", "eval_reward_dropped"}
    finally:
        tr.close()


def test_failing_reward_drops_its_sample_and_the_run_goes_on(task):
    calls = []

    def flaky(prompt, completion):
        calls.append(completion)
        if len(calls) == 3:
            raise RuntimeError("the verifier broke")
        if len(calls) == 6:
            return float("nan")
        return RT.dense(prompt, completion)

    tr = _trainer(task, reward=flaky)
    try:
        m = tr.step()
        assert m["reward_dropped"] == 2 and math.isfinite(m["reward"]) and math.isfinite(m["loss"])
        assert tr.step()["reward_dropped"] == 0 and tr.step_count == 2
    finally:
        tr.close()


def test_lagged_rollouts_are_corrected_or_dropped(task):
    tr = _trainer(task, rollout_lag=1, max_staleness=1)
    try:
        ms = [tr.step() for _ in range(3)]
        assert [m["staleness"] for m in ms] == [0, 1, 1]  # the first batch was sampled before any step
        assert all(m["stale_dropped"] == 0 for m in ms)
        assert ms[2]["log_ratio"] > 0  # sampled by older weights: the ratio is not 1
        assert len(tr.pending) == 1 and tr.pending[0][0].version == 2
    finally:
        tr.close()
    tr = _trainer(task, max_staleness=0)
    try:
        old = tr.collect(tr.submit(tr.prompts, tr.iterator.next(), samples=4, temperature=1.0, seeds=range(16)))
        tr.step()
        m = tr.learn(old)  # version 0 rollouts at version 1: beyond the bound
        assert m["stale_dropped"] == 16 and m["staleness"] == 1
    finally:
        tr.close()


@pytest.mark.parametrize("rl_kw", [dict(baseline="value", kl_alpha=0.05, kl_estimator="k3"),
                                   dict(baseline="value", samples_per_prompt=1)])
def test_value_baseline_and_k3(task, rl_kw):
    tr = _trainer(task, **rl_kw)
    try:
        ms = [tr.step() for _ in range(3)]
        assert ms[0]["value"] == 0.0  # the head starts at 0
        assert all(math.isfinite(m["value_loss"]) and math.isfinite(m["loss"]) for m in ms)
        assert ms[2]["value"] != 0.0  # it learned
    finally:
        tr.close()


def test_gkd_term_pulls_toward_the_teacher(task):
    teacher = RT.B.make_model(task, RT.SIZE, 5)
    policy = RT.B.make_model(task, RT.SIZE, 0)
    rng = np.random.default_rng(7)
    cfg = T.TrainConfig(steps=4, batch_size=4, seq_len=task.seq_len, learning_rate=1e-2)
    rc = RLT.RLConfig(samples_per_prompt=2, max_new_tokens=task.n + 1, stop_ids=(task.tok.end_of_turn_id,),
                      gkd_weight=1.0, gkd_beta=1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        RLT.RLTrainer(RT.B.make_model(task, RT.SIZE, 0), task.tok, [([2, 4, 3], None)], cfg, rc, RT.dense)
    tr = RLT.RLTrainer(policy, task.tok, RT.pairs(task.prompts("train", 8, rng)), cfg, rc, RT.dense,
                       teacher=teacher)
    try:
        held = task.batch([task.example(p, rng) for p in task.prompts("heldout", 16, rng)])
        before = RT.B.divergences(tr.model(), teacher, task, held)["reverse_kl"]
        ms = [tr.step() for _ in range(4)]  # a = 1: the divergence alone
        after = RT.B.divergences(tr.model(), teacher, task, held)["reverse_kl"]
        assert after < before * 0.9, (before, after, [m["loss"] for m in ms])
    finally:
        tr.close()


def test_bad_prompts_and_reward(task):
    cfg = T.TrainConfig(steps=1, batch_size=2, seq_len=task.seq_len)
    rc = RLT.RLConfig(samples_per_prompt=2, max_new_tokens=task.n + 1)
    model = RT.B.make_model(task, RT.SIZE, 0)
    with pytest.raises(ValueError, match="prompt 1 has 9 tokens: with max_new_tokens 4 that is over seq_len 9"):
        RLT.RLTrainer(model, task.tok, [([2, 4], None), ([2] * 9, None)], cfg, rc, RT.dense)
    with pytest.raises(ValueError, match=r"prompt 0 holds id 99, outside the vocabulary \[0, 12\)"):
        RLT.RLTrainer(model, task.tok, [([2, 99], None)], cfg, rc, RT.dense)
    with pytest.raises(TypeError, match="reward must be a function"):
        RLT.RLTrainer(model, task.tok, [([2, 4], None)], cfg, rc, 3.0)


# ---------------------------------------------------------------- the run directory: SIGKILL and resume


def _run(out, *flags, cache, killed=False):
    r = subprocess.run([sys.executable, WORKER, str(out), *flags], capture_output=True, text=True, timeout=600,
                       env=_cache_env(cache))
    if killed:
        assert r.returncode == -9, r.stderr[-2000:]
    else:
        assert r.returncode == 0, r.stderr[-3000:]


def _params(path):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoints.load(path)))]


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_killed_run_resumes_to_the_bit(tmp_path, xla_cache):
    """Value baseline, rollouts one version behind (the pending batch is in the checkpoint), KL 0.1: killed after
    step 5 (checkpoints at 2, 4, 6, written asynchronously: 2 is complete, 4 may be), rerun, equal to an
    uninterrupted run in every parameter and metric."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(whole, cache=xla_cache)
    _run(cut, "--kill-at-step", "5", killed=True, cache=xla_cache)
    assert not os.path.exists(cut / "gemma_config.json")
    done = sorted(int(d) for d in os.listdir(cut / "checkpoints") if d.isdigit())
    assert done in ([2], [2, 4]), done
    assert max(x["step"] for x in _metrics(cut)) == 5
    _run(cut, cache=xla_cache)
    for a, b in zip(_params(cut), _params(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    lines, want = _metrics(cut), _metrics(whole)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "eval_reward" in r] == [0, 3, 6]
    drop = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert drop(lines) == drop(want)
    assert lines[2]["staleness"] == 1 and "value_loss" in lines[2]
    run = json.load(open(cut / "run.json"))
    assert run["baseline"] == "value" and run["rollout_lag"] == 1 and run["reward"].endswith("rl_task:dense")
    with pytest.raises(ValueError, match="holds another run .*kl_alpha: 0.1 there, 0.2 now"):
        rl_run.check_output(str(cut), {**run, "kl_alpha": 0.2})


# ---------------------------------------------------------------- the command line


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "gemma", "rl", *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """A tiny policy with the real tokenizer (orbax dir), prompts, a reward file."""
    from gemma import config as config_lib
    from gemma.transformer import Transformer

    d = tmp_path_factory.mktemp("cli")
    tokenizer = checkpoints.load_tokenizer("gemma3-270m")
    c = config_lib.tiny(vocab_size=262_144, d_model=32, hidden_dim=64, head_dim=8, num_heads=2, num_kv_heads=1,
                        num_layers=2, layer_types=("global", "global"))
    checkpoints.save(Transformer(c, rngs=nnx.Rngs(0)), d / "policy", tokenizer=tokenizer)
    (d / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["Say yes.", "Count to 3."]))
    (d / "rewards.py").write_text("def short(prompt, completion):\n    return -len(completion) / 10\n")
    return d


def test_cli_runs_resumes_and_loads(cli_files):
    d, out = cli_files, cli_files / "out"
    args = ["--model", str(d / "policy"), "--data", str(d / "prompts.jsonl"), "--output", str(out),
            "--reward", f"{d / 'rewards.py'}:short", "--steps", "2", "--batch-size", "2", "--samples-per-prompt",
            "2", "--seq-len", "40", "--max-new-tokens", "6", "--kl-alpha", "0.1", "--learning-rate", "1e-3"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the policy is in" in r.stderr
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and all(x["kl"] >= 0 for x in lines)
    assert checkpoints.load(str(out)).config.d_model == 32
    r = _cli(*args)  # the finished run: nothing more to do
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2]
    r = _cli(*[a if a != "0.1" else "0.2" for a in args])
    assert r.returncode == 2 and "kl_alpha: 0.1 there, 0.2 now" in r.stderr


def test_cli_with_a_reward_model_directory(cli_files, tmp_path):
    """--reward-model DIR: the reward-model command's output (checkpoints.save of a RewardModel) scores the
    completions; a policy directory there is refused, saying how to make a reward model of it."""
    from gemma.train.reward_model import RewardModel

    d = cli_files
    policy = checkpoints.load(str(d / "policy"))
    rm_dir = checkpoints.save(RewardModel(policy), tmp_path / "rm")
    out = tmp_path / "out"
    args = ["--model", str(d / "policy"), "--data", str(d / "prompts.jsonl"), "--output", str(out),
            "--reward-model", rm_dir, "--steps", "1", "--batch-size", "2", "--samples-per-prompt", "2",
            "--seq-len", "40", "--max-new-tokens", "4"]
    r = _cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert line["step"] == 1 and math.isfinite(line["reward"])
    swap = {rm_dir: str(d / "policy"), str(out): str(tmp_path / "o2")}
    r = _cli(*[swap.get(a, a) for a in args])
    assert r.returncode == 2 and "holds a policy" in r.stderr and "reward-model" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("change, message", [
    ({"--kl-alpha": "-1"}, "kl_alpha (the KL weight) must be a finite number >= 0, got -1.0"),
    ({"--samples-per-prompt": "1"}, "needs samples_per_prompt >= 2, got 1"),
    ({"--reward": "nosuchmodule_xyz:f"}, "--reward nosuchmodule_xyz:f: cannot import nosuchmodule_xyz"),
    ({"--reward": "rewards"}, "expected MODULE:FUNCTION"),
    ({"--grad-accum": "2"}, "--grad-accum 2: an RL step learns its rollouts in one micro-batch"),
    ({"--gkd-weight": "0.5"}, "--gkd-weight 0.5 needs --teacher"),
    ({"--data": "/nonexistent.jsonl"}, "--data /nonexistent.jsonl: no such file"),
    ({"--reward": None, "--reward-model": "/nonexistent_rm"}, "--reward-model /nonexistent_rm: no such directory"),
])
def test_cli_bad_flags(cli_files, tmp_path, monkeypatch, capsys, change, message):
    """In this process (gemma.__main__.main, as `python -m gemma rl` runs it): exit 2, the message, nothing written
    and no weights loaded."""
    from gemma import __main__ as cli

    d = cli_files
    flags = {"--model": str(d / "policy"), "--data": str(d / "prompts.jsonl"), "--output": str(tmp_path / "o"),
             "--reward": f"{d / 'rewards.py'}:short", "--steps": "1"}
    flags.update(change)
    monkeypatch.setattr(cli, "_enable_compilation_cache", lambda: None)  # keeps the module's cache
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # --reward MODULE:FUNCTION puts the working directory there
    assert cli.main(["rl", *sum(([k, v] for k, v in flags.items() if v is not None), [])]) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not os.path.exists(tmp_path / "o")


def test_load_prompts_errors(tmp_path):
    tok = checkpoints.load_tokenizer("gemma3-270m")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hi"}\n{"response": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected \{'prompt': str\} or \{'text': str\}"):
        rl_run.load_prompts(str(f), tok)
    f.write_text('{"prompt": "hi"}\n{"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z"}\n')
    (hi, _), (long_text, _) = rl_run.load_prompts(str(f), tok)[0]
    assert hi[:2] == [tok.bos_id, tok.start_of_turn_id] and len(long_text) > len(hi)
    prompts, counts = rl_run.load_prompts(str(f), tok, max_len=len(hi), long="drop")
    assert counts == {"prompts": 1, "truncated": 0, "dropped": 1} and prompts[0] == (hi, "hi")
    prompts, counts = rl_run.load_prompts(str(f), tok, max_len=len(hi), long="truncate")
    assert counts["truncated"] == 1 and prompts[1][0] == long_text[:len(hi)]
    with pytest.raises(ValueError, match=f"p.jsonl:2: the prompt has {len(long_text)} tokens, more than the "
                                         f"{len(hi)}"):
        rl_run.load_prompts(str(f), tok, max_len=len(hi), long="error")
    f.write_text('{"prompt": "hi"}\n{"prompt": "hi"\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: malformed JSON"):
        rl_run.load_prompts(str(f), tok)
    f.write_text("\n")
    with pytest.raises(ValueError, match=r"p.jsonl: no examples \(the file is empty\); expected one JSON object a "
                                         r"line with the fields \{'prompt': str\} or \{'text': str\}"):
        rl_run.load_prompts(str(f), tok)
    f.write_text('{"text": "a b c d e f g h i j k l m n o p q r s t u v w x y z"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: no prompts left \(1 dropped as too long\)"):
        rl_run.load_prompts(str(f), tok, max_len=len(hi), long="drop")


# ---------------------------------------------------------------- acceptance (issue 19)

ACCEPT = dict(n=3, digits=10)  # 120 digit sets: 84 for training, 36 held out (never seen in training)


@pytest.fixture(scope="module")
def warm_ups():
    """seed -> (task, warm-up policy, its validity, its steps), each trained once for the acceptance tests (which take
    copies: a trainer takes its policy over)."""
    made = {}

    def get(seed):
        if seed not in made:
            task = RT.Task(**ACCEPT, seed=seed)
            made[seed] = (task, *RT.warm_up(task, seed))
        return made[seed]
    return get


def _measure_prompts(task, seed, count=128):
    return task.prompts("heldout", count, np.random.default_rng([seed, 9]))  # not the warm-up's stopping set


@pytest.mark.parametrize("seed", [0, 1])
def test_acceptance_dense_verifier_raises_greedy_validity(seed, warm_ups):
    """A warm-up policy solving 20-50% of held-out prompts greedily; 100 RL steps (8 prompts x 8 samples, the
    group baseline, KL 0.05 to the warm-up) on the dense verifier raise held-out greedy validity >= 25 points
    while the samples stay diverse (distinct completions per prompt > 1)."""
    import time

    t0 = time.perf_counter()
    task, warm, band_validity, warm_steps = warm_ups(seed)
    policy = RT.B.copy_of(warm)
    measure = _measure_prompts(task, seed)
    before = RT.B.validity(policy, task, measure)
    cfg = T.TrainConfig(steps=100, batch_size=8, seq_len=task.seq_len, learning_rate=3e-3, end_learning_rate=3e-3,
                        warmup_steps=5, seed=seed)
    rc = RLT.RLConfig(samples_per_prompt=8, kl_alpha=0.05, max_new_tokens=task.n + 1,
                      stop_ids=(task.tok.end_of_turn_id,))
    train = RT.pairs(task.prompts("train", 256, np.random.default_rng([seed, 7])))
    tr = RLT.RLTrainer(policy, task.tok, train, cfg, rc, RT.dense, metric=RT.valid)
    t1 = time.perf_counter()
    try:
        ms = [tr.step() for _ in range(cfg.steps)]
        after = RT.B.validity(tr.model(), task, measure)
    finally:
        tr.close()
    distinct = np.mean([m["distinct"] for m in ms[-10:]])
    print(f"seed {seed}: warm-up {warm_steps} steps ({band_validity:.3f} on its stopping set), held-out greedy "
          f"validity {before:.3f} -> {after:.3f} ({after - before:+.3f}); sampled validity "
          f"{np.mean([m['metric'] for m in ms[:10]]):.3f} -> {np.mean([m['metric'] for m in ms[-10:]]):.3f}; "
          f"distinct of 8 {np.mean([m['distinct'] for m in ms[:10]]):.2f} -> {distinct:.2f}; KL {ms[-1]['kl']:.3f}; "
          f"warm-up {t1 - t0:.0f} s, RL {time.perf_counter() - t1:.0f} s, load {os.getloadavg()[0]:.1f}")
    assert 0.2 <= band_validity <= 0.5 and 0.15 <= before <= 0.55
    assert after - before >= 0.25
    assert distinct > 1.5


def test_acceptance_kl_sweep_and_reward_hacking(tmp_path, warm_ups):
    """The hackable proxy (precision: a one-digit answer scores 1) at alpha 0, 0.1 and 1: a larger alpha keeps the
    KL to the warm-up lower at equal steps; the monitor (eval proxy reward up while held-out validity falls) flags
    hacking at alpha 0, where the completions shrink."""
    import time

    seed = 0
    task, warm, _, _ = warm_ups(seed)
    train = RT.pairs(task.prompts("train", 256, np.random.default_rng([seed, 7])))
    held = RT.pairs(task.prompts("heldout", 64, np.random.default_rng([seed, 9])))
    out = {}
    for alpha in (0.0, 0.1, 1.0):
        t0 = time.perf_counter()
        cfg = T.TrainConfig(steps=50, batch_size=8, seq_len=task.seq_len, learning_rate=3e-3,
                            end_learning_rate=3e-3, warmup_steps=5, seed=seed)
        rc = RLT.RLConfig(samples_per_prompt=8, kl_alpha=alpha, max_new_tokens=task.n + 1,
                          stop_ids=(task.tok.end_of_turn_id,))
        r = rl_run.rl(RT.B.copy_of(warm), task.tok, train, str(tmp_path / f"a{alpha}"), config=cfg, rl_config=rc,
                      reward=RT.proxy, metric=RT.valid, eval_prompts=held, eval_every=10, model_source="warm-up",
                      data_source="permutations", progress=False)
        lines = _metrics(tmp_path / f"a{alpha}")
        steps, evals = [x for x in lines if "loss" in x], [x for x in lines if "eval_reward" in x]
        out[alpha] = {"kl": np.mean([x["kl"] for x in steps[-5:]]), "hacking": r["hacking"],
                      "proxy": [round(x["eval_reward"], 3) for x in evals],
                      "validity": [round(x["eval_metric"], 3) for x in evals],
                      "length": [round(x["eval_length"], 2) for x in evals], "seconds": time.perf_counter() - t0}
        print(f"alpha {alpha}: {out[alpha]}, load {os.getloadavg()[0]:.1f}")
    kls = [out[a]["kl"] for a in (0.0, 0.1, 1.0)]
    assert kls[0] > kls[1] > kls[2], kls
    assert out[0.0]["hacking"] is not None
    assert out[0.0]["length"][-1] < out[0.0]["length"][0] - 0.5  # the short-answer hack
