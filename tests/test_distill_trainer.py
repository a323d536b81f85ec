"""The GKD trainer: micro-batch invariance, on-policy responses, compatibility errors, a run directory killed and
resumed to the bit, and the `distill` command line's refusals."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import checkpoints
from gemma import config
from gemma.sampler import Sampler
from gemma.serve import Engine
from gemma.train import data, distill_trainer as DT, trainer as T
from gemma.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "fixtures", "finetune", "sample.jsonl")
SMALL_V = 512


def _tiny(v=SMALL_V, d=32, seed=0):
    return Transformer(config.tiny(vocab_size=v, d_model=d, hidden_dim=64, head_dim=8, num_heads=2, num_kv_heads=1),
                       rngs=nnx.Rngs(seed))


def _examples(n=8, length=12, v=SMALL_V, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, v, length).astype(np.int32)
        ids[0] = 2
        out.append(data.Example(ids, np.arange(length) >= 5))
    return out


def _batches(examples, rows, seq_len=16):
    it = data.make_iterator(examples, batch_size=rows, seq_len=seq_len, seed=0, packing=False, prefetch=0)
    return [next(it) for _ in range(len(examples) // rows)]


def _params(tr):
    return [np.asarray(x) for x in jax.tree.leaves(tr.trainable)]


def _sharp_teacher(d=48, seed=1):
    """A tiny teacher with logits far from the student's (gradients well above Adam's eps)."""
    t = _tiny(d=d, seed=seed)
    t.embedder.embedding[...] = t.embedder.embedding[...] * 16
    return t


def test_micro_batches_equal_one_batch(beta=0.5):
    """2 micro-batches of 2 rows = 1 batch of 4 rows: loss and parameters after one update (lmbda 0)."""
    examples = _examples(n=4)
    dc = DT.DistillConfig(lmbda=0.0, beta=beta)
    results = []
    for rows, accum in ((2, 2), (4, 1)):
        cfg = T.TrainConfig(steps=2, batch_size=rows, seq_len=16, grad_accum=accum, learning_rate=1e-2)
        tr = DT.DistillTrainer(_tiny(), _sharp_teacher(), None, cfg, dc)
        m = tr.step(_batches(examples, rows))
        results.append((m, _params(tr)))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    assert m1["tokens"] == m2["tokens"] == 4 * 7  # response tokens: positions 4..10 predict 5..11
    # parameters after one update, globally: Adam's first step, g / (|g| + eps), turns f32 rounding of the
    # summation order in gradients near eps into O(lr) differences of single entries (measured 1.6e-5 relative)
    diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(p1, p2)))
    assert diff <= 1e-4 * np.sqrt(sum(np.sum(a ** 2) for a in p1))


class _Tok:
    eos_id, end_of_turn_id, bos_id, pad_id, start_of_turn_id = 1, 106, 2, 0, 105
    vocab_size = SMALL_V

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_on_policy_responses_replace_the_dataset_ones():
    examples = _examples(n=4)
    batch = _batches(examples, 4, seq_len=20)[0]
    student = _tiny()
    out = DT.generate_responses(student, _Tok(), batch, max_new_tokens=6, temperature=1.0, seed=0)
    again = DT.generate_responses(student, _Tok(), batch, max_new_tokens=6, temperature=1.0, seed=0)
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a, b)  # seeded
    for r in range(4):
        np.testing.assert_array_equal(out.inputs[r, :5], batch.inputs[r, :5])  # the prompt stays
        # response tokens: 6 generated (no stop id in a random tiny model's first draws is not assumed)
        n = int(out.weights[r].sum())
        assert 1 <= n <= 6
        np.testing.assert_array_equal(out.weights[r, 4:4 + n], 1)
        assert out.weights[r, 4 + n:].sum() == 0
    assert not np.array_equal(out.inputs[:, 5:11], batch.inputs[:, 5:11])
    # a stop id ends a response, kept as its last loss token
    student.embedder.embedding[...] = student.embedder.embedding[...].at[106].mul(200.0)
    stopped = DT.generate_responses(student, _Tok(), batch, max_new_tokens=6, temperature=0.0, seed=0)
    last = [int(stopped.inputs[r, 4 + int(stopped.weights[r].sum())]) for r in range(4)]
    assert 106 in last


def test_greedy_responses_equal_sampler_generate():
    """Through a one-off engine and through a kept one: each row's response is Sampler.generate's greedy
    continuation of its prompt (stopped at <end_of_turn>, kept as the last loss token)."""
    batch = _batches(_examples(n=4), 4, seq_len=20)[0]
    student = _tiny(seed=2)
    student.embedder.embedding[...] = student.embedder.embedding[...].at[106].mul(40.0)  # some rows stop
    sampler = Sampler(student, _Tok(), max_len=20)
    sampler.stop_ids = (106,)
    with Engine(student, _Tok(), max_batch=4, max_len=20) as engine:
        for source in (student, engine):
            out = DT.generate_responses(source, _Tok(), batch, max_new_tokens=8, temperature=0.0, seed=0)
            for r, prompt in enumerate(DT.prompts_of(batch)):
                want = sampler.generate(prompt, max_new_tokens=8).tokens
                want = want + [106] if len(want) < 8 else want
                assert out.targets[r, 4:4 + int(out.weights[r].sum())].tolist() == want, r


def test_trainer_generates_through_one_engine_without_recompiling():
    """The student's engine is made once and gets each step's weights by update_weights: after one step and
    the engine's warm-up, two more steps compile nothing (jax's backend-compile events), and the engine
    decodes with the trainer's current weights."""
    cfg = T.TrainConfig(steps=4, batch_size=2, seq_len=16, learning_rate=1e-2)
    batches = _batches(_examples(n=8), 2)
    compiles = []

    def listener(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    with DT.DistillTrainer(_tiny(), _sharp_teacher(), _Tok(), cfg,
                           DT.DistillConfig(lmbda=1.0, beta=1.0, max_new_tokens=4, gen_temperature=1.0)) as tr:
        tr.step([batches[0]])
        engine = tr._engines["student"]
        engine.warmup()
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            for b in batches[1:3]:
                tr.step([b])
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        assert compiles == [] and tr._engines["student"] is engine
        assert engine.weights_version == 2  # pushed before steps 2 and 3 generated
        tr.engine("student", batches[3])  # pushes step 3's weights
        kept = DT.generate_responses(engine, _Tok(), batches[3], max_new_tokens=4, temperature=0.0, seed=0)
        fresh = DT.generate_responses(tr.student(), _Tok(), batches[3], max_new_tokens=4, temperature=0.0, seed=0)
        for a, b in zip(kept, fresh):
            np.testing.assert_array_equal(a, b)
    assert not tr._engines and not engine._thread.is_alive()


def test_lmbda_coin_and_metrics():
    examples = _examples(n=8)
    cfg = T.TrainConfig(steps=4, batch_size=2, seq_len=16, grad_accum=2, learning_rate=1e-3)
    tr = DT.DistillTrainer(_tiny(), _tiny(d=48, seed=1), _Tok(), cfg,
                           DT.DistillConfig(lmbda=1.0, beta=1.0, max_new_tokens=4))
    m = tr.step(_batches(examples, 2)[:2])
    assert m["on_policy"] == 1.0 and np.isfinite(m["loss"]) and m["tokens"] <= 4 * 4


def test_compatibility_and_settings_errors():
    with pytest.raises(ValueError, match="teacher and student vocabularies differ: the teacher has 600 ids, "
                                         "the student 512"):
        DT.DistillTrainer(_tiny(), _tiny(v=600), None, T.TrainConfig(), DT.DistillConfig())
    assert DT.shared_vocab(config.gemma3_270m(), config.gemma3_4b()) == 262_144  # text + multimodal table
    with pytest.raises(ValueError, match="needs the tokenizer"):
        DT.DistillTrainer(_tiny(), _tiny(d=48), None, T.TrainConfig(), DT.DistillConfig(lmbda=0.5))

    class Other(_Tok):
        end_of_turn_id = 107
    with pytest.raises(ValueError, match="tokenizers differ: end_of_turn_id 107 vs 106"):
        DT.shared_vocab(config.tiny(), config.tiny(), _Tok(), Other())
    for kw, msg in (({"lmbda": 1.5}, "lmbda must be a number in \\[0, 1\\]"),
                    ({"beta": -0.5}, "beta must be a number in \\[0, 1\\]"),
                    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
                    ({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1")):
        with pytest.raises(ValueError, match=msg):
            DT.DistillConfig(**kw)


# ---------------------------------------------------------------- the run directory, killed and resumed

WORKER = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
from flax import nnx
import checkpoints
from gemma import config
from gemma.transformer import Transformer
from gemma.train import distill_run, distill_trainer, trainer
out, kill = sys.argv[1], int(sys.argv[2])
if kill:
    step = distill_trainer.DistillTrainer.step
    def killing(self, batches):
        result = step(self, batches)
        if self.step_count == kill + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    distill_trainer.DistillTrainer.step = killing
tiny = lambda d, seed: Transformer(config.tiny(vocab_size=262144, d_model=d, hidden_dim=64, head_dim=8, num_heads=2,
                                               num_kv_heads=1), rngs=nnx.Rngs(seed))
cfg = trainer.TrainConfig(steps=5, batch_size=2, seq_len=48, learning_rate=1e-3, warmup_steps=1)
dc = distill_trainer.DistillConfig(lmbda=0.5, beta=0.5, max_new_tokens=8)
distill_run.distill(tiny(16, 0), tiny(24, 1), checkpoints.load_tokenizer("gemma3-270m"), {data!r}, out, config=cfg,
                    distill=dc, eval_path={data!r}, save_every=2, eval_every=5, student_source="tiny-s",
                    teacher_source="tiny-t", progress=False)
"""


def _run(out, kill=0):
    code = WORKER.format(root=ROOT, data=DATA)
    # the three runs share one persistent compilation cache: the second and third load the first's programs
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(out.parent / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    r = subprocess.run([sys.executable, "-c", code, str(out), str(kill)], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == (-9 if kill else 0), r.stderr[-3000:]


def test_killed_run_resumes_to_the_bit(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(whole)
    _run(cut, kill=3)
    assert not os.path.exists(cut / "gemma_config.json")
    _run(cut)
    ours = [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoints.load(str(cut))))]
    theirs = [np.asarray(x) for x in jax.tree.leaves(nnx.state(checkpoints.load(str(whole))))]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    lines = [json.loads(x) for x in open(cut / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 5]
    want = [json.loads(x) for x in open(whole / "metrics.jsonl")]
    assert [(r["loss"], r["on_policy"]) for r in lines if "loss" in r] == \
        [(r["loss"], r["on_policy"]) for r in want if "loss" in r]
    assert {r["on_policy"] for r in lines if "loss" in r} == {0.0, 1.0}  # both kinds of step happened
    run = json.load(open(cut / "run.json"))
    assert run["teacher"] == "tiny-t" and run["lmbda"] == 0.5


# ---------------------------------------------------------------- the command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gemma", "distill", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.parametrize("flags, message", [
    (["--lmbda", "1.5"], "--lmbda must be in [0, 1], got 1.5"),
    (["--beta", "-0.1"], "--beta must be in [0, 1], got -0.1"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    (["--sampled-teacher", "0", "--lmbda", "0"], "--sampled-teacher K must be >= 1, got 0"),
    (["--top-k-teacher", "-3", "--lmbda", "0"], "--top-k-teacher K must be >= 1, got -3"),
    (["--sampled-teacher", "4"], "need lmbda 0 and no seq_kd (got lmbda 0.5"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, flags, message):
    r = _cli("--teacher", "gemma3-270m", "--student", "gemma3-270m", "--data", DATA, "--output",
             str(tmp_path / "o"), *flags)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "o")


def test_cli_vocabularies_differ(tmp_path):
    tok = checkpoints.load_tokenizer("gemma3-270m")
    for name, v in (("s", 262_144), ("t", 262_208)):
        m = Transformer(config.tiny(vocab_size=v, d_model=16, hidden_dim=32, head_dim=8, num_heads=2,
                                    num_kv_heads=1), rngs=nnx.Rngs(0))
        checkpoints.save(m, str(tmp_path / name), tokenizer=tok)
    small = Transformer(config.tiny(vocab_size=1000, d_model=16, hidden_dim=32, head_dim=8, num_heads=2,
                                    num_kv_heads=1), rngs=nnx.Rngs(0))
    checkpoints.save(small, str(tmp_path / "small"), tokenizer=tok)
    r = _cli("--teacher", str(tmp_path / "small"), "--student", str(tmp_path / "s"), "--data", DATA, "--output",
             str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: teacher and student vocabularies differ: the teacher has 1000 "
                                             "ids, the student 262144; distillation needs one tokenizer (Gemma 3 "
                                             "models share the 262144-id one)"]
    assert not os.path.exists(tmp_path / "o")
    # a multimodal-sized table meets a text one on the first 262144 ids: it runs, and the result loads
    r = _cli("--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"), "--data", DATA, "--output",
             str(tmp_path / "ok"), "--steps", "2", "--batch-size", "2", "--seq-len", "48", "--lmbda", "1",
             "--max-new-tokens", "4", "--learning-rate", "1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([json.loads(x) for x in open(tmp_path / "ok" / "metrics.jsonl")]) == 2
    assert checkpoints.load(str(tmp_path / "ok")).config.vocab_size == 262_144


def test_a_quantized_teacher_distills_like_its_float_weights():
    """A teacher held quantized (its tied head too) gives the loss of the same teacher in float within the
    int8 rounding: the trainer reads the dequantized table, not a float table it lacks."""
    from checkpoints.quantize import quantize_model

    examples = _examples(n=4)
    cfg = T.TrainConfig(steps=1, batch_size=4, seq_len=16, learning_rate=1e-2)
    losses = []
    for quantize in (False, True):
        teacher = Transformer(config.tiny(vocab_size=SMALL_V, d_model=64, hidden_dim=64, head_dim=16, num_heads=2,
                                          num_kv_heads=1), rngs=nnx.Rngs(1))  # contractions of whole groups of 32
        teacher.embedder.embedding[...] = teacher.embedder.embedding[...] * 16
        teacher = quantize_model(teacher, "int8") if quantize else teacher
        tr = DT.DistillTrainer(_tiny(), teacher, None, cfg, DT.DistillConfig(lmbda=0.0))
        losses.append(tr.step(_batches(examples, 4))["loss"])
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)  # measured 9e-5
