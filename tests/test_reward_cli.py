"""`python -m gemma reward-model`: bad input exits 2 with one line before the weights load, writing nothing; a
tiny WARM run (2 members) end to end through the command line, rerun and refused; a killed run resumed
bitwise."""

import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

import checkpoints
from gemma import config
from gemma.__main__ import main
from gemma.train import merges, reward_cli, reward_run
from gemma.train import reward_model as R
from gemma.train.trainer import TrainConfig
from gemma.transformer import Transformer

PAIR = {"prompt": "Is the sky blue?", "chosen": "Yes.", "rejected": "No."}
TRIPLE = {"document": "The cat is red.", "summary": "A red cat.", "entailed": True}


def _tiny(seed=0):
    return Transformer(config.tiny(vocab_size=262_144, d_model=32, hidden_dim=64, head_dim=8), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_270m):
    """A tiny random policy with the real tokenizer, saved as our orbax checkpoint."""
    return checkpoints.save(_tiny(), tmp_path_factory.mktemp("tiny_model"), tokenizer=tokenizer_270m)


def _jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _fails(monkeypatch, capsys, argv, match):
    loaded = []
    monkeypatch.setattr(checkpoints, "load", lambda *a, **k: loaded.append(a) or pytest.fail("weights loaded"))
    assert main(["reward-model", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")
    assert re.search(match, err), err
    assert not loaded


def _params(model):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _pairs(n):
    """Preference pairs a tiny model separates in a few steps: the chosen response agrees."""
    questions = ["Is the sky blue?", "Is water wet?", "Is fire hot?", "Is snow cold?", "Is grass green?",
                 "Is the sun bright?", "Is ice solid?", "Is honey sweet?"]
    return [{"prompt": questions[i % len(questions)] + f" ({i})", "chosen": "Yes, it is.",
             "rejected": "No, it is not."} for i in range(n)]


# ---------------------------------------------------------------- the command line: bad input


def test_the_parser_constants_are_the_run_modules():
    assert (reward_cli.OBJECTIVES, reward_cli.LONG, reward_cli.FORMATS) == (reward_run.OBJECTIVES, reward_run.LONG,
                                                                            reward_run.FORMATS)


def test_bad_data_files(tmp_path, monkeypatch, capsys, tiny_dir):
    out = tmp_path / "out"
    base = ["--model", tiny_dir, "--output", str(out), "--steps", "2"]
    cases = [
        ([PAIR, "{not json"], r"bad\.jsonl:2: malformed JSON"),
        ([PAIR, {**PAIR, "extra": 1}], r"bad\.jsonl:2: unknown field 'extra'"),
        ([{"prompt": "a", "chosen": "b"}], r"bad\.jsonl:1: the fields \['chosen', 'prompt'\] match no format"),
        ([{**PAIR, "chosen": ""}], r"bad\.jsonl:1: 'chosen' is empty"),
        ([{**PAIR, "rejected": 3}], r"bad\.jsonl:1: 'rejected' must be a string"),
        ([{**TRIPLE, "entailed": "yes"}], r"bad\.jsonl:1: 'entailed' must be true or false"),
        ([PAIR, TRIPLE], r"bad\.jsonl:2: a record of .*document.* in a file of .*chosen.* records"),
        ([[1, 2]], r"bad\.jsonl:1: expected a JSON object"),
        ([], r"no examples"),
    ]
    for lines, match in cases:
        _fails(monkeypatch, capsys, [*base, "--data", _jsonl(tmp_path / "bad.jsonl", lines)], match)
    pairs = _jsonl(tmp_path / "pairs.jsonl", [PAIR])
    _fails(monkeypatch, capsys, [*base, "--data", pairs, "--objective", "entailment"],
           r"pairs\.jsonl:1: --objective entailment needs records with the fields \['document', 'entailed'")
    triples = _jsonl(tmp_path / "triples.jsonl", [TRIPLE])
    _fails(monkeypatch, capsys, [*base, "--data", pairs, "--eval-data", triples],
           r"triples\.jsonl:1: --objective bradley-terry needs")
    long = _jsonl(tmp_path / "long.jsonl", [PAIR, {**PAIR, "rejected": "no " * 100}])
    _fails(monkeypatch, capsys, [*base, "--data", long, "--seq-len", "32", "--long", "error"],
           r"long\.jsonl:2: the example has \d+ tokens, more than --seq-len 32")
    _fails(monkeypatch, capsys, [*base, "--data", _jsonl(tmp_path / "all_long.jsonl", [{**PAIR, "chosen": "a " * 99}]),
                                 "--seq-len", "32"], r"no example fits --seq-len 32 \(1 dropped\)")
    assert not out.exists()


def test_bad_settings(tmp_path, monkeypatch, capsys, tiny_dir):
    data = _jsonl(tmp_path / "d.jsonl", [PAIR])
    base = ["--model", tiny_dir, "--data", data, "--output", str(tmp_path / "out")]
    _fails(monkeypatch, capsys, [*base, "--members", "0"], r"--members must be >= 1, got 0")
    _fails(monkeypatch, capsys, [*base, "--steps", "0"], r"--steps must be >= 1")
    _fails(monkeypatch, capsys, [*base, "--epochs", "0"], r"--epochs must be > 0")
    _fails(monkeypatch, capsys, [*base, "--learning-rate=-1e-4"], r"learning_rate must be > 0")
    _fails(monkeypatch, capsys, [*base, "--batch-size", "0"], r"batch_size must be an int >= 1")
    _fails(monkeypatch, capsys, [*base, "--eval-data", str(tmp_path / "none.jsonl")], r"--eval-data .*no such file")
    _fails(monkeypatch, capsys, ["--model", str(tmp_path / "nowhere"), *base[2:]], r"no such file or directory")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    _fails(monkeypatch, capsys, [*base[:4], "--output", str(tmp_path / "taken")], r"not empty and holds no")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- end to end


def test_warm_run_end_to_end_then_resumes_and_refuses_another_run(tmp_path, tiny_dir, monkeypatch, capsys):
    data = _jsonl(tmp_path / "train.jsonl", _pairs(16))
    held_out = _jsonl(tmp_path / "eval.jsonl", _pairs(24)[16:])
    out = tmp_path / "run"
    argv = ["reward-model", "--model", tiny_dir, "--data", data, "--eval-data", held_out, "--output", str(out),
            "--members", "2", "--steps", "8", "--batch-size", "4", "--learning-rate", "3e-3", "--eval-every", "4"]
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "the WARM average of 2 members is in" in err and "checkpoints.load_reward_model" in err
    lines = _metrics(out)
    assert [(r["step"], r["member"], r["member_step"]) for r in lines if "loss" in r] == \
        [(k * 8 + s, k, s) for k in range(2) for s in range(1, 9)]
    assert [(r["step"], r["member"]) for r in lines if "eval_accuracy" in r] == [(0, 0), (4, 0), (8, 0), (12, 1),
                                                                                 (16, 1)]
    first, *_, last = [r for r in lines if "loss" in r]
    assert first["loss"] == pytest.approx(np.log(2), rel=1e-5)  # the zero head: every reward 0
    warm = lines[-1]
    assert warm["step"] == 16 and len(warm["members_eval_accuracy"]) == 2
    members = [checkpoints.load_reward_model(out / "members" / str(k)) for k in range(2)]
    averaged = checkpoints.load_reward_model(out)
    want = merges.average([nnx.state(m, nnx.Param) for m in members])
    for k, v in _params(averaged).items():
        np.testing.assert_array_equal(v, _params(nnx.merge(nnx.graphdef(averaged), want))[k], err_msg=k)
    assert not np.array_equal(members[0].head.w[...], members[1].head.w[...])  # two data orders
    evals = R.evaluate(averaged, reward_run.eval_batches(
        reward_run.load_examples(held_out, checkpoints.load_tokenizer(out), 512)[1], "bradley-terry", 4))
    assert evals["accuracy"] == warm["warm_eval_accuracy"] and evals["loss"] == pytest.approx(warm["warm_eval_loss"])
    # the task is learnt (measured: accuracy 1.0 for both members and the average, last loss 0.42 from log 2)
    assert warm["warm_eval_accuracy"] == 1.0 and last["loss"] < 0.6, (warm, last)
    before = (out / "metrics.jsonl").read_text()
    assert main(argv) == 0  # a rerun of a finished run: nothing trained, the same result
    assert (out / "metrics.jsonl").read_text() == before and "step 16: loss" in capsys.readouterr().err
    _fails(monkeypatch, capsys, [*argv[1:-2], "--eval-every", "2", "--learning-rate", "1e-3"], r"holds another run")
    _fails(monkeypatch, capsys, [*argv[1:], "--members", "3"], r"holds another run \(members: 2 there, 3 now\)")


def test_a_killed_run_resumes_bitwise(tmp_path, tokenizer_270m, monkeypatch):
    """Entailment triples, 2 members of 5 steps, a checkpoint every 2: killed (an exception) at step 8, inside
    member 1; the rerun continues from the checkpoint of step 7 and ends with the parameters of an uninterrupted run."""
    rng = np.random.default_rng(0)
    facts = ["The cat is red.", "The box is big.", "The car is old.", "The cup is hot."]
    triples = [{"document": " ".join(rng.permutation(facts)[:2]), "summary": str(rng.choice(facts)),
                "entailed": bool(i % 2)} for i in range(12)]
    data = _jsonl(tmp_path / "t.jsonl", triples)
    init = R.RewardModel(_tiny(3))
    cfg = TrainConfig(steps=5, batch_size=3, learning_rate=1e-3)
    kw = dict(config=cfg, members=2, save_every=2, eval_path=data, progress=False)
    whole = reward_run.train_reward_model(init, tokenizer_270m, data, str(tmp_path / "whole"), **kw)

    calls, step = [], R.RewardTrainer.step

    def dies_at_8(self, batch):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("killed")
        return step(self, batch)

    monkeypatch.setattr(R.RewardTrainer, "step", dies_at_8)
    with pytest.raises(KeyboardInterrupt):
        reward_run.train_reward_model(init, tokenizer_270m, data, str(tmp_path / "cut"), **kw)
    again = []
    monkeypatch.setattr(R.RewardTrainer, "step", lambda self, batch: again.append(1) or step(self, batch))
    resumed = reward_run.train_reward_model(init, tokenizer_270m, data, str(tmp_path / "cut"), **kw)
    assert len(again) == 3  # steps 8-10: the interrupted run finished writing step 7's checkpoint
    a, b = _params(whole["model"]), _params(resumed["model"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in range(2):
        np.testing.assert_array_equal(
            checkpoints.load_reward_model(tmp_path / "whole" / "members" / str(k)).head.w[...],
            checkpoints.load_reward_model(tmp_path / "cut" / "members" / str(k)).head.w[...])
    cut = _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut if "loss" in r] == list(range(1, 11))  # each step once
    assert [r["loss"] for r in cut if "loss" in r] == [r["loss"] for r in _metrics(tmp_path / "whole") if "loss" in r]
    assert resumed["eval_accuracy"] == whole["eval_accuracy"]
    np.testing.assert_array_equal(init.head.w[...], 0)  # init is not changed
