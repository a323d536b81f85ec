"""Sparse teacher targets precomputed once to disk and streamed into batches (Gemma 3's sampled-logit KD).

    write_targets(teacher, examples, "targets/", k=256, mode="sampled")      # the teacher runs once
    store = TargetStore("targets/")
    it = data.make_iterator(examples, ..., batch_fn=store.batch_fn(k=256))   # TargetBatch rows

Format (a directory): meta.json (mode, k, temperature, seed, vocab_size, counts, dtypes); positions.bin
int64 [E + 1] (example i's loss positions are rows [positions[i], positions[i + 1]) of the target table);
offsets.bin int64 [P + 1] (row j's entries are [offsets[j], offsets[j + 1])); ids.bin (uint16 when V <= 65536,
else uint32) and probs.bin (float16) [nnz]: each loss position's distinct target ids (ascending) and their
probabilities. A loss position of an example is a t with loss_mask[t + 1] True (the one whose logits predict
a trained token), in order. Frequencies count / K are exact in float16 for K <= 2048.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from gemma.train import data as data_lib
from gemma.train.distill import sample_targets

META = "meta.json"


class TargetBatch(NamedTuple):
    """data.Batch plus each position's sparse teacher target [rows, seq_len, K] (0 weight where none)."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    target_ids: np.ndarray    # int32
    target_probs: np.ndarray  # float32


def loss_positions(example: data_lib.Example) -> np.ndarray:
    return np.flatnonzero(example.loss_mask[1:])


def _dedupe(ids: np.ndarray, probs: np.ndarray, mode: str):
    """Rows of K sorted ids -> (distinct ids, their probabilities, entries per row)."""
    p, k = ids.shape
    keep = np.ones(ids.shape, bool)
    keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
    if mode == "top_k":
        keep[:] = True
    flat_keep = keep.reshape(-1)
    if mode == "sampled":  # weight = run length / K
        starts = np.flatnonzero(flat_keep)
        values = np.diff(np.append(starts, p * k)) / k
    else:
        values = probs.reshape(-1)[flat_keep]
    return ids.reshape(-1)[flat_keep], values, keep.sum(axis=1)


def write_targets(teacher, examples, path: str, *, k: int = 256, mode: str = "sampled", temperature: float = 1.0,
                  seed: int = 0, seq_len: int | None = None, block: int = 64, progress: bool = True) -> dict:
    """Runs `teacher` (a Transformer) over each example once and writes its sparse targets to directory `path`
    (created; must not hold a store). Returns the meta. Deterministic in `seed`."""
    if os.path.exists(os.path.join(path, META)):
        raise ValueError(f"{path} already holds teacher targets ({META}); give a new directory")
    vocab = teacher.config.vocab_size
    sample_targets(jnp.zeros((1, vocab)), jax.random.key(0), k, mode=mode, temperature=temperature)  # checks
    os.makedirs(path, exist_ok=True)
    id_dtype = np.uint16 if vocab <= 2**16 else np.uint32
    seq_len = seq_len or max(len(e) for e in examples)
    graphdef, state = nnx.split(teacher)

    @jax.jit
    def hidden(state, ids):
        model = nnx.merge(graphdef, state)
        pos = jnp.arange(ids.shape[1])[None]
        return model.forward(ids, pos, jnp.ones(ids.shape, bool), return_hidden=True)[0]

    @jax.jit
    def draw(state, h, key):
        model = nnx.merge(graphdef, state)
        return sample_targets(model.logits(h[None])[0], key, k, mode=mode, temperature=temperature)

    files = {name: open(os.path.join(path, f"{name}.bin"), "wb") for name in ("ids", "probs", "offsets")}
    positions, nnz, rows = [0], 0, 0
    files["offsets"].write(np.zeros(1, np.int64).tobytes())
    key = jax.random.key(seed)
    for i, ex in enumerate(tqdm(examples, desc="teacher targets", unit="example", disable=not progress)):
        at = loss_positions(ex)
        padded = np.zeros((1, seq_len), np.int32)
        padded[0, :len(ex)] = ex.ids
        h = hidden(state, jnp.asarray(padded))[at]
        for b in range(0, len(at), block):
            part = h[b:b + block]
            n = part.shape[0]
            part = jnp.pad(part, ((0, block - n), (0, 0)))  # one compiled shape
            ids, probs = jax.device_get(draw(state, part, jax.random.fold_in(jax.random.fold_in(key, i), b)))
            ids, values, counts = _dedupe(np.asarray(ids)[:n], np.asarray(probs)[:n], mode)
            files["ids"].write(ids.astype(id_dtype).tobytes())
            files["probs"].write(values.astype(np.float16).tobytes())
            files["offsets"].write((nnz + np.cumsum(counts)).astype(np.int64).tobytes())
            nnz += int(counts.sum())
        rows += len(at)
        positions.append(rows)
    for f in files.values():
        f.close()
    with open(os.path.join(path, "positions.bin"), "wb") as f:
        f.write(np.asarray(positions, np.int64).tobytes())
    meta = {"mode": mode, "k": k, "temperature": temperature, "seed": seed, "vocab_size": vocab,
            "examples": len(examples), "positions": rows, "entries": nnz, "id_dtype": np.dtype(id_dtype).name}
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


class TargetStore:
    """A directory written by `write_targets`, memory-mapped (nothing is read until a batch needs it)."""

    def __init__(self, path: str):
        meta_file = os.path.join(path, META)
        if not os.path.isfile(meta_file):
            raise ValueError(f"{path}: no teacher targets ({META} missing); write them with write_targets")
        with open(meta_file) as f:
            self.meta = json.load(f)
        self.path = path
        self.k = int(self.meta["k"])
        read = lambda name, dtype: np.memmap(os.path.join(path, f"{name}.bin"), dtype=dtype, mode="r")  # noqa: E731
        self.positions = read("positions", np.int64)
        self.offsets = read("offsets", np.int64)
        self.ids = read("ids", np.dtype(self.meta["id_dtype"]))
        self.probs = read("probs", np.float16)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the targets (every file)."""
        return sum(os.path.getsize(os.path.join(self.path, f)) for f in os.listdir(self.path))

    def example(self, i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, probs) of each loss position of example i."""
        lo, hi = int(self.positions[i]), int(self.positions[i + 1])
        off = self.offsets[lo:hi + 1]
        return [(self.ids[a:b], self.probs[a:b]) for a, b in zip(off[:-1], off[1:])]

    def check(self, examples) -> None:
        """ValueError unless the store was written for these examples (same count and loss positions)."""
        if len(examples) != self.meta["examples"]:
            raise ValueError(f"{self.path} holds targets of {self.meta['examples']} examples, the data has "
                             f"{len(examples)}: write the targets for this data (and --seq-len)")
        counts = np.diff(np.asarray(self.positions))
        ours = np.asarray([len(loss_positions(e)) for e in examples])
        if not np.array_equal(counts, ours):
            bad = int(np.flatnonzero(counts != ours)[0])
            raise ValueError(f"{self.path}: example {bad} has {ours[bad]} loss positions, its targets "
                             f"{counts[bad]}: the targets were written for other data or --seq-len")

    def batch_fn(self, k: int | None = None):
        """A `batch_fn` for data.make_iterator: rows -> TargetBatch with K = k (default the store's K) slots."""
        k = k or self.k

        def make(rows, *, examples, seq_len, lo, hi) -> TargetBatch:
            b = data_lib._make_batch(rows, examples=examples, seq_len=seq_len, lo=lo, hi=hi)
            ids = np.zeros((*b.inputs.shape, k), np.int32)
            probs = np.zeros((*b.inputs.shape, k), np.float32)
            for r, row in enumerate(rows[lo:hi]):
                start = 0
                for i in row:
                    for t, (tid, tp) in zip(loss_positions(examples[i]), self.example(i)):
                        ids[r, start + t, :len(tid)] = tid
                        probs[r, start + t, :len(tid)] = tp
                    start += len(examples[i])
            return TargetBatch(*b, ids, probs)

        return make
