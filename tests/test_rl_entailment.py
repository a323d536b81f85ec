"""Issue 19's entailment acceptance (Roit et al. 2023): a reward model trained on tests/entailment_data.py, RL of a
tiny summariser with its reward log P(entailed | document, summary) and a KL penalty to the supervised policy,
the true consistency rate (entailment_data.is_entailed) before and after, and the length monitor of the
short-summary hack. The task's pieces are tests/entailment_rl.py."""

import os
import time

import numpy as np
import pytest

import entailment_data as E
import entailment_rl as ER
import rl_task as RT
from gemma.train import reward_model as R
from gemma.train import rl_trainer as RLT
from gemma.train import trainer as T

V = ER.VOCAB


# ---------------------------------------------------------------- the task's pieces


def test_summary_text_and_the_true_metric():
    doc = "the cat is red . the box is big ."
    assert ER.FactTokenizer().decode([V["said:cat_red"], V["said:box_big"]]) == "said:cat_red said:box_big"
    assert ER.summary_text("said:cat_red said:box_big") == doc
    assert ER.consistent(doc, "said:box_big") == 1.0
    assert ER.consistent(doc, "said:box_small") == 0.0  # a contradiction
    assert ER.consistent(doc, "said:cat_red said:dog_red") == 0.0  # an invention
    assert ER.consistent(doc, "") == 0.0  # the empty summary is not entailed
    assert ER.summary_text("cat_red") is None and ER.consistent(doc, "cat_red") == 0.0  # a document id
    assert ER.consistent(doc, "said:cat_red <sep>") == 0.0
    for e in E.generate(200, seed=4, **ER.SETTINGS):  # the metric on the generator's summaries is its label
        completion = ER.FactTokenizer().decode(E.tokenize(e.summary, V, summary=True))
        assert ER.consistent(e.document, completion) == float(e.entailed)


def test_entailment_reward_scores_the_reward_models_rows():
    """The adapter's reward is entailment_reward of the reward model on entailment_data.encode's rows of the same
    (document, summary); an empty summary is scored at <sep>; a completion past MAX_NEW_TOKENS is refused."""
    rm = R.RewardModel(ER.backbone(0))
    rm.head.w[...] = np.random.default_rng(0).normal(size=rm.head.w.shape).astype(np.float32)
    reward = ER.EntailmentReward(rm)
    ex = E.generate(6, seed=1, **ER.SETTINGS)
    tokens, mask, _ = E.encode(ex, V, length=ER.RM_LENGTH, eos=False)
    want = np.asarray(R.entailment_reward(rm(tokens, mask)))
    tok = ER.FactTokenizer()
    got = [reward(e.document, tok.decode(E.tokenize(e.summary, V, summary=True))) for e in ex]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert all(g <= 0 for g in got) and len(set(np.round(got, 6))) > 1
    empty = reward(ex[0].document, "")
    sep_row, sep_mask = R.pad_rows([ER.prompt_ids(ex[0].document)], ER.RM_LENGTH, left=True)
    assert empty == pytest.approx(float(R.entailment_reward(rm(sep_row, sep_mask))[0]), rel=1e-5)
    with pytest.raises(ValueError, match="of 5 tokens is longer than MAX_NEW_TOKENS=4"):
        reward("the cat is red . the box is big . the dog is old .", " ".join(["said:cat_red"] * 5))
    with pytest.raises(TypeError, match="takes a reward_model.RewardModel"):
        ER.EntailmentReward(lambda d, s: 0.0)


def test_length_monitor_flags_a_collapse_on_hand_made_records():
    """Reward up while summaries shrink by more than the margin (in facts) is flagged at that step; reward up at
    a steady length, or summaries shrinking without a reward gain, are not."""
    collapse = [{"step": s, "eval_reward": r, "eval_length": n} for s, r, n in
                [(0, -3.0, 1.6), (20, -1.5, 1.5), (40, -0.8, 1.2), (60, -0.3, 0.3)]]
    assert ER.short_summary_hack(collapse) == 60  # 1.3 facts below the longest so far, reward 2.7 up
    assert ER.short_summary_hack(collapse, margin=0.25) == 40  # 0.4 facts below, reward 2.2 up
    steady = [{**r, "eval_length": 1.5 + 0.05 * (r["step"] % 40 == 0)} for r in collapse]
    assert ER.short_summary_hack(steady) is None
    no_gain = [{**r, "eval_reward": -3.0} for r in collapse]
    assert ER.short_summary_hack(no_gain) is None


# ---------------------------------------------------------------- acceptance (issue 19)

RL_STEPS, EVAL_EVERY = 60, 20
HELD_OUT, SAMPLES = 128, 4  # 512 sampled summaries a measurement


@pytest.fixture(scope="module")
def prepared():
    """seed -> the seed's reward model, its held-out accuracy, the supervised summariser, their seconds (each seed
    trained once for the module's tests)."""
    done = {}

    def get(seed):
        if seed not in done:
            t0 = time.perf_counter()
            rm, accuracy = ER.train_reward_model(seed)
            t1 = time.perf_counter()
            done[seed] = {"rm": rm, "accuracy": accuracy, "policy": ER.warm_up(seed), "rm_s": t1 - t0,
                          "sft_s": time.perf_counter() - t1}
        return done[seed]

    return get


def _rl(prepared, seed, kl_alpha):
    """RL_STEPS steps (8 documents x 8 samples, the group baseline, KL kl_alpha to the supervised summariser) with
    the reward model's log P(entailed); measured on held-out documents every EVAL_EVERY steps."""
    p = prepared(seed)
    held = ER.prompts(E.generate(HELD_OUT, seed=seed + 3000, **ER.SETTINGS))
    train = ER.prompts(E.generate(512, seed=seed + 4000, **ER.SETTINGS))
    cfg = T.TrainConfig(steps=RL_STEPS, batch_size=8, seq_len=ER.SEQ_LEN, learning_rate=3e-3,
                        end_learning_rate=3e-3, warmup_steps=5, seed=seed)
    rc = RLT.RLConfig(samples_per_prompt=8, kl_alpha=kl_alpha, max_new_tokens=ER.MAX_NEW_TOKENS,
                      stop_ids=(V["<eos>"],))
    reward = ER.EntailmentReward(p["rm"])
    empty_reward = float(np.mean([reward(doc, "") for _, doc in held]))  # what the hack would earn
    t0 = time.perf_counter()
    tr = RLT.RLTrainer(RT.B.copy_of(p["policy"]), ER.FactTokenizer(), train, cfg, rc, reward, metric=ER.consistent)
    records, greedy, kl = [], [], None
    try:
        for step in range(RL_STEPS + 1):
            if step % EVAL_EVERY == 0:
                records.append({"step": step, **ER.measure(tr, held, samples=SAMPLES, temperature=1.0, seed=1)})
                greedy.append(ER.measure(tr, held)["consistency"])
            if step < RL_STEPS:
                kl = tr.step()["kl"]
    finally:
        tr.close()
    hack = ER.short_summary_hack(records)
    print(f"\nseed {seed}, KL {kl_alpha}: reward model held-out accuracy {p['accuracy']:.4f}, its reward of the "
          f"empty summary {empty_reward:.2f}; sampled consistency {[round(r['consistency'], 3) for r in records]}, "
          f"facts {[round(r['eval_length'], 2) for r in records]}, empty {[round(r['empty'], 3) for r in records]}, "
          f"reward {[round(r['eval_reward'], 2) for r in records]} at steps {[r['step'] for r in records]}; greedy "
          f"consistency {[round(g, 3) for g in greedy]}; short-summary hack at step {hack}; final KL {kl:.2f}; "
          f"reward model {p['rm_s']:.0f} s, supervised {p['sft_s']:.0f} s, RL {time.perf_counter() - t0:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}")
    return records, hack


@pytest.mark.parametrize("seed", [0, 1])
def test_acceptance_entailment_reward_raises_true_consistency(prepared, seed):
    """A reward model trained on the generator (>= 0.9 held-out accuracy); a summariser fine-tuned on summaries
    half of them entailed (its samples consistent 30-70% of the time; its greedy summary is already its most
    likely, entailed fact, so the rate measured is that of its samples at temperature 1); RL at KL 1 raises the
    true consistency rate of held-out samples by >= 15 points: a rate measured on 512 samples has a standard
    error <= 2.2 points, a difference of two <= 3.1, so 15 points is about 5 of them. The length monitor (mean
    facts a summary, the share of empty ones, short_summary_hack over the evaluations) is measured and printed:
    how far summaries shrink at this KL is a finding, not asserted."""
    records, _ = _rl(prepared, seed, kl_alpha=1.0)
    assert prepared(seed)["accuracy"] >= 0.9
    first, last = records[0], records[-1]
    assert 0.3 <= first["consistency"] <= 0.7, first
    assert last["consistency"] - first["consistency"] >= 0.15, records
    assert all(0 <= r["eval_length"] <= ER.MAX_NEW_TOKENS and 0 <= r["empty"] <= 1 for r in records)


def test_without_kl_the_summariser_finds_the_short_summary_hack(prepared):
    """Roit et al.'s failure: seed 1's reward model (accurate on the generator's summaries, which are never empty)
    gives the empty summary a high log P(entailed); without the KL penalty RL collapses to it: the length monitor
    flags the run, most summaries are empty and the true consistency rate falls while the reward rises."""
    records, hack = _rl(prepared, 1, kl_alpha=0.0)
    first, last = records[0], records[-1]
    assert hack is not None, records
    assert last["empty"] >= 0.5 and last["eval_reward"] > first["eval_reward"], records
    assert last["consistency"] < first["consistency"] - 0.15, records
