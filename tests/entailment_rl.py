"""The entailment RL task (Roit et al. 2023) on tests/entailment_data.py's fact-level tokens: a prompt is
<bos> document <sep>, a completion the summary's ids then <eos>; the reward is a trained reward model's
log P(entailed | document, summary), the true metric entailment_data.is_entailed.

    rm, accuracy = train_reward_model(seed=0)
    policy = warm_up(seed=0)                          # supervised on entailed and non-entailed summaries
    reward = EntailmentReward(rm)                     # (document, completion) -> log P(entailed)
    consistent(document, completion), summary_text(completion)
    short_summary_hack(records)                       # the length monitor

Completions reach the reward and the metric as FactTokenizer.decode's text: the vocabulary's names joined by
spaces ("said:cat_red said:box_big"), so the reward model scores exactly the ids the policy wrote.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import entailment_data as E  # noqa: E402

from gemma import config as config_lib  # noqa: E402
from gemma.train import data as data_lib  # noqa: E402
from gemma.train import reward_model as R  # noqa: E402
from gemma.train import rl_trainer as RLT  # noqa: E402
from gemma.train import trainer as T  # noqa: E402
from gemma.transformer import Transformer  # noqa: E402

VOCAB = E.FACT_VOCAB
NAMES = {i: w for w, i in VOCAB.items()}
SAID = "said:"
# the universe of test_reward_model (5 objects x 3 attributes, 2-3 facts a document), summaries of 1-2 facts
SETTINGS = dict(facts=(2, 3), summary_facts=(1, 2), objects=E.OBJECTS[:5], attributes=E.ATTRIBUTES[:3])
MAX_FACTS = 3  # a completion may run one fact past the longest supervised summary
MAX_NEW_TOKENS = MAX_FACTS + 1  # the facts and <eos>
PROMPT_LEN = 1 + SETTINGS["facts"][1] + 1
SEQ_LEN = PROMPT_LEN + MAX_NEW_TOKENS
RM_LENGTH = PROMPT_LEN + MAX_NEW_TOKENS  # reward-model rows: <bos> document <sep> summary (a truncated one too)


class FactTokenizer:
    """What the RL trainer and the engine read of a tokenizer over FACT_VOCAB: the special ids, the size, decode."""

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = VOCAB["<pad>"], VOCAB["<bos>"], VOCAB["<eos>"]
        self.start_of_turn_id = self.end_of_turn_id = VOCAB["<sep>"]
        self.vocab_size = len(VOCAB)

    def decode(self, ids) -> str:
        return " ".join(NAMES[int(i)] for i in ids)


def prompt_ids(document: str) -> list[int]:
    return [VOCAB["<bos>"]] + E.tokenize(document, VOCAB) + [VOCAB["<sep>"]]


def prompts(examples) -> list[tuple[list[int], str]]:
    """(ids, document) pairs for the RL trainer: the reward and the metric receive the document text."""
    return [(prompt_ids(e.document), e.document) for e in examples]


def summary_text(completion: str) -> str | None:
    """The fact-grammar text of a completion of summary ids ("said:cat_red" -> "the cat is red ."), None when
    one of its tokens is not a summary fact (a document fact, <sep>, ...)."""
    words = completion.split()
    if not all(w.startswith(SAID) and w in VOCAB for w in words):
        return None
    return " ".join(E.fact(*w[len(SAID):].split("_")) for w in words)


def consistent(document: str, completion: str) -> float:
    """The true metric: 1 when the completion is a summary whose every fact is in the document (is_entailed: an
    empty summary is not)."""
    text = summary_text(completion)
    return float(text is not None and E.is_entailed(document, text))


# ---------------------------------------------------------------- the reward model


def backbone(seed: int, layers: int = 1, d_model: int = 32) -> Transformer:
    cfg = config_lib.tiny(vocab_size=len(VOCAB), num_layers=layers, layer_types=("global",) * layers,
                          d_model=d_model, hidden_dim=2 * d_model, head_dim=16, num_heads=2, num_kv_heads=1,
                          sliding_window=SEQ_LEN, query_pre_attn_scalar=16)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def labelled(examples) -> R.Labelled:
    return R.Labelled(*E.encode(examples, VOCAB, length=RM_LENGTH, eos=False))


def train_reward_model(seed: int, *, steps: int = 1200, batch: int = 32, lr: float = 3e-3, layers: int = 2,
                       d_model: int = 64, held_out: int = 2000):
    """An entailment reward model (reward_model.train on fresh generator rows) and its held-out accuracy."""
    rows = labelled(E.generate(steps * batch, seed=seed, **SETTINGS))
    batches = [R.Labelled(*(x[i * batch:(i + 1) * batch] for x in rows)) for i in range(steps)]
    rm = R.RewardModel(backbone(seed, layers, d_model))
    R.train(rm, batches, T.TrainConfig(steps=steps, learning_rate=lr, warmup_steps=steps // 10))
    return rm, R.accuracy(rm, [labelled(E.generate(held_out, seed=seed + 1000, **SETTINGS))])


class EntailmentReward:
    """The RL reward of a completion: entailment_reward(rm(<bos> document <sep> summary ids)), the reward model
    reading exactly the ids the policy wrote before <eos> (an empty summary ends at <sep>). Rows are left-padded
    to one length (one compilation); scores are cached per (document, completion)."""

    def __init__(self, rm: R.RewardModel):
        if not isinstance(rm, R.RewardModel):
            raise TypeError(f"EntailmentReward takes a reward_model.RewardModel, got {type(rm).__name__}")
        self.rm, self.cache = rm, {}

    def __call__(self, document: str, completion: str) -> float:
        key = (document, completion)
        if key not in self.cache:
            ids = prompt_ids(document) + [VOCAB[w] for w in completion.split()]
            if len(ids) > RM_LENGTH:
                raise ValueError(f"a completion of {len(ids) - len(prompt_ids(document))} tokens is longer than "
                                 f"MAX_NEW_TOKENS={MAX_NEW_TOKENS}")
            tokens, mask = R.pad_rows([ids], RM_LENGTH, left=True)
            self.cache[key] = float(R.entailment_reward(self.rm(tokens, mask))[0])
        return self.cache[key]


# ---------------------------------------------------------------- the summariser


def policy(seed: int, layers: int = 1, d_model: int = 64) -> Transformer:
    cfg = config_lib.tiny(vocab_size=len(VOCAB), num_layers=layers, layer_types=("global",) * layers,
                          d_model=d_model, hidden_dim=4 * d_model, head_dim=16, num_heads=4, num_kv_heads=1,
                          sliding_window=SEQ_LEN, query_pre_attn_scalar=16)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def sft_example(e: E.Example) -> data_lib.Example:
    """<bos> document <sep> summary <eos>, the loss on the summary and its <eos>."""
    p = prompt_ids(e.document)
    ids = np.asarray(p + E.tokenize(e.summary, VOCAB, summary=True) + [VOCAB["<eos>"]], np.int32)
    return data_lib.Example(ids, np.arange(len(ids)) >= len(p))


def warm_up(seed: int, *, steps: int = 300, batch: int = 32, lr: float = 3e-3, entailed_share: float = 0.5):
    """A policy fine-tuned by cross-entropy on (document -> summary) pairs, `entailed_share` of them entailed
    (the others contradict or invent a fact): its samples are consistent about (or, as the model's per-token
    errors compound over two facts, somewhat less than) that often."""
    model = policy(seed)
    cfg = T.TrainConfig(steps=steps, batch_size=batch, seq_len=SEQ_LEN, learning_rate=lr, end_learning_rate=lr / 10,
                        warmup_steps=steps // 10, seed=seed)
    tr = T.Trainer(model, cfg)
    examples = [sft_example(e) for e in E.generate(steps * batch, seed=seed + 2000, entailed_share=entailed_share,
                                                   **SETTINGS)]
    for i in range(steps):
        chunk = examples[i * batch:(i + 1) * batch]
        tr.step([data_lib._make_batch([(j,) for j in range(batch)], examples=chunk, seq_len=SEQ_LEN, lo=0,
                                      hi=batch)])
    return tr.model()


# ---------------------------------------------------------------- measures and the length monitor


def measure(trainer: RLT.RLTrainer, held, *, samples: int = 1, temperature: float = 0.0, seed: int = 0) -> dict:
    """`samples` completions of each held-out (ids, document) pair through the trainer's engine with its current
    weights: the reward, the true consistency rate, the mean summary length (tokens before <eos>: facts, in a
    well-formed summary) and the share of empty summaries (Roit et al.'s hack at its extreme)."""
    wait, trainer.engine.max_wait_s = trainer.engine.max_wait_s, 0.0  # a partial batch need not wait
    try:
        out, size = [], trainer.engine.max_batch // samples
        for start in range(0, len(held), size):
            indices = range(start, min(start + size, len(held)))
            out += trainer.collect(trainer.submit(held, indices, samples=samples, temperature=temperature,
                                                  seeds=[seed + samples * i + k for i in indices
                                                         for k in range(samples)]))
    finally:
        trainer.engine.max_wait_s = wait
    facts = [len(r.tokens) - r.stopped for r in out]
    rewards = [r.reward for r in out if r.reward is not None]
    return {"eval_reward": float(np.mean(rewards)) if rewards else float("nan"),
            "consistency": float(np.mean([r.metric for r in out])), "eval_length": float(np.mean(facts)),
            "empty": float(np.mean([f == 0 for f in facts]))}


def short_summary_hack(records, *, reward: str = "eval_reward", length: str = "eval_length",
                       margin: float = 0.5) -> int | None:
    """Roit et al.'s short-summary hack: the first step where the reward stands `margin` above its first value
    while the mean summary length stands `margin` facts below its longest so far (half a fact: every other
    summary lost one); None when that never happens.
    rl_trainer.reward_hacking with the length as the quantity the reward must not trade away."""
    return RLT.reward_hacking(records, reward, length, margin=margin)
