"""Fine-tuning data: JSONL records -> token ids + loss mask -> packed, sharded, resumable batches.

Records (one JSON object a line):

    {"messages": [{"role": "system"|"user"|"model"|"assistant", "content": str}, ...]}
    {"prompt": str, "response": str}
    {"text": str}

Chat records are rendered with `gemma.chat.format_turn`, the template ChatSampler feeds at inference,
and encoded piece by piece as inference sees them: BOS, each prompt segment (`format_turn(...)` text,
`add_bos=False`), each model reply encoded on its own, then `<end_of_turn>` (id 106). So the ids of a
reply are exactly the ids the model generates after its prompt. A reply's closing 106 is the first id of
the next prompt segment (format_turn opens turns after the first with "<end_of_turn>\\n", as ChatSampler
feeds it); after the last reply 106 is appended and nothing else. The loss mask is True on each reply's
ids and its closing 106 only; on `{"text"}` records on every token after BOS (no EOS is added).

Batches (`Batch`, numpy, [rows, seq_len]): `targets[t]` is the next token of the same example,
`weights[t]` = loss_mask[t + 1] of that example (0 on its last position, on padding), `positions`
restart at 0 per example, `segment_ids` count 1, 2, ... per example within a row (0 on padding).

Order. With packing, examples are packed once into rows by best fit over a seed-derived order (the
"layout"); without packing, each example is a row. Every epoch shuffles the rows with a seed-derived
permutation and pads the epoch with empty rows to a whole number of global batches, so an epoch is
exactly `steps_per_epoch(...)` batches, holds every example once, and no batch mixes two epochs.

Grain does the iteration: the layout is a `grain.MapDataset` (shuffle per epoch, repeat, batch,
per-process slice, prefetch thread), so the iterator state is grain's index into a random-access
dataset and restores exactly in a fresh process. grain 0.2.18's packers (`FirstFitPackIterDataset`,
which does keep segment ids and positions) are not used: they pack a stream, so examples of two epochs
share the batches at each epoch boundary and an epoch is not a whole number of batches (`--epochs`
could not be counted, nor "every example once per epoch" hold), and first fit emits all its bins as
soon as one example fits none of them, which pads more than packing the whole data set once. Packing
once fixes which examples share a row (they never attend to each other); batches still change each epoch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator, NamedTuple

import grain
import numpy as np

from gemma.chat import format_turn

_ROLES = {"system": "system", "user": "user", "model": "model", "assistant": "model"}
_FIELDS = ("messages", "prompt", "response", "text")
_FORMATS = "{'messages'}, {'prompt', 'response'} or {'text'}"
_LONG = ("truncate", "drop", "error")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: `ids` int32 [n], BOS first; `loss_mask` bool [n], True where token i is a
    loss token (its prediction from position i - 1 is trained)."""

    ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class Batch(NamedTuple):
    """A batch (or one process's rows of it), numpy arrays [rows, seq_len]; a NamedTuple is a jax pytree."""

    inputs: np.ndarray       # int32 token ids; 0 on padding
    targets: np.ndarray      # int32 next token of the same example; 0 where there is none
    weights: np.ndarray      # float32 1.0 where targets[b, t] is a loss token
    positions: np.ndarray    # int32 restarting at 0 per example; 0 on padding
    segment_ids: np.ndarray  # int32 1, 2, ... per example within a row; 0 on padding


# ---------------------------------------------------------------- reading and validating records


def _read(path, parse=None, formats: str = _FORMATS) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line, parsed and validated by `parse(record, "FILE:LINE")`
    (default: the fine-tuning formats; `formats` names what an empty file should have held)."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{os.fspath(path)}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            (parse or _parse)(record, where)
            out.append((lineno, record))
    if not out:
        raise ValueError(f"{os.fspath(path)}: no examples (the file is empty); expected one JSON object a "
                         f"line with the fields {formats}")
    return out


def read_jsonl(path) -> list[dict]:
    """The records of a JSONL file, parsed and validated; ValueError naming FILE:LINE on bad input."""
    return [record for _, record in _read(path)]


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__}: {value!r:.60}")
    if not value.strip():
        raise ValueError(f"{where}: {what} is empty")
    return value


def _parse(record, where: str):
    """Validated record -> ("text", text) or ("chat", system | None, [(user, model), ...])."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with the fields {_FORMATS}, "
                         f"got {type(record).__name__}")
    unknown = [k for k in record if k not in _FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown field {', '.join(map(repr, unknown))}; expected the fields {_FORMATS}")
    keys = set(record)
    if keys == {"text"}:
        return "text", _text(record["text"], "'text'", where)
    if keys == {"prompt", "response"}:
        return "chat", None, [(_text(record["prompt"], "'prompt'", where),
                               _text(record["response"], "'response'", where))]
    if keys != {"messages"}:
        raise ValueError(f"{where}: the fields {sorted(keys)} match no format; expected {_FORMATS}")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    turns = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where}: {at} must be an object with 'role' and 'content', got {type(m).__name__}")
        extra = [k for k in m if k not in ("role", "content")]
        if extra or set(m) != {"role", "content"}:
            what = f"unknown field {', '.join(map(repr, extra))}" if extra else \
                f"missing {', '.join(repr(k) for k in ('role', 'content') if k not in m)}"
            raise ValueError(f"{where}: {at}: {what}; expected 'role' and 'content'")
        role = m["role"]
        if role not in _ROLES:
            raise ValueError(f"{where}: {at}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        turns.append((_ROLES[role], _text(m["content"], f"{at}.content", where)))
    system = None
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            at = f"messages[{i + (system is not None)}]"
            why = "a system turn may only come first" if role == "system" else \
                "turns must alternate user, model, user, ... starting with user"
            raise ValueError(f"{where}: {at} is a {role} turn where a {expected} turn was expected ({why})")
    if not turns or turns[-1][0] != "model":
        raise ValueError(f"{where}: the last turn must be a model turn (there is nothing to learn after a "
                         f"{turns[-1][0] if turns else 'system'} turn)")
    return "chat", system, [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


# ---------------------------------------------------------------- rendering


def render(record: dict, tokenizer, *, where: str = "record") -> Example:
    """One record -> its ids (BOS first) and loss mask, as ChatSampler's template renders it."""
    parsed = _parse(record, where)
    eot = tokenizer.end_of_turn_id
    if parsed[0] == "text":
        ids = [tokenizer.bos_id] + tokenizer.encode(parsed[1], add_bos=False)
        return Example(np.asarray(ids, np.int32), np.arange(len(ids)) > 0)
    _, system, pairs = parsed
    ids, mask = [tokenizer.bos_id], [False]
    for i, (user, reply) in enumerate(pairs):
        prompt = tokenizer.encode(format_turn(user, first=i == 0, system=system if i == 0 else None),
                                  add_bos=False)
        if i > 0:  # the prompt opens with the previous reply's <end_of_turn>: a loss token
            if prompt[0] != eot:
                raise ValueError(f"{where}: format_turn no longer opens a later turn with <end_of_turn>")
            ids.append(eot)
            mask.append(True)
            prompt = prompt[1:]
        answer = tokenizer.encode(reply, add_bos=False)
        ids += prompt + answer
        mask += [False] * len(prompt) + [True] * len(answer)
    ids.append(eot)
    mask.append(True)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def load_examples(path, tokenizer, seq_len: int, long: str = "truncate") -> tuple[list[Example], dict]:
    """Reads, validates and renders a JSONL file; examples longer than `seq_len` tokens are cut to it
    ("truncate"; one left with no loss token is dropped), dropped ("drop"), or raise ("error").

    Returns (examples, counts) with counts {"examples", "truncated", "dropped", "tokens", "loss_tokens"}
    of the kept examples."""
    if long not in _LONG:
        raise ValueError(f"long={long!r}; expected one of {', '.join(map(repr, _LONG))}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    examples, truncated, dropped = [], 0, 0
    for lineno, record in _read(path):
        where = f"{os.fspath(path)}:{lineno}"
        ex = render(record, tokenizer, where=where)
        if len(ex) > seq_len:
            if long == "error":
                raise ValueError(f"{where}: the example has {len(ex)} tokens, more than seq_len={seq_len} "
                                 f"(use long='truncate' or 'drop', or a larger seq_len)")
            if long == "drop":
                dropped += 1
                continue
            ex = Example(ex.ids[:seq_len], ex.loss_mask[:seq_len])
            if not ex.loss_mask.any():
                dropped += 1
                continue
            truncated += 1
        examples.append(ex)
    if not examples:
        raise ValueError(f"{os.fspath(path)}: no example fits seq_len={seq_len} ({dropped} dropped)")
    counts = {"examples": len(examples), "truncated": truncated, "dropped": dropped,
              "tokens": int(sum(len(e) for e in examples)),
              "loss_tokens": int(sum(int(e.loss_mask.sum()) for e in examples))}
    return examples, counts


# ---------------------------------------------------------------- layout, batches, iterator


def _check(examples, batch_size, seq_len, seed, shard_index=0, shard_count=1):
    if not examples:
        raise ValueError("no examples")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if batch_size < 1 or shard_count < 1 or batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    longest = max(len(e) for e in examples)
    if longest > seq_len:
        raise ValueError(f"an example has {longest} tokens, more than seq_len={seq_len} "
                         "(load the examples with the same seq_len)")


def _layout(examples, seq_len: int, seed: int, packing: bool) -> list[tuple[int, ...]]:
    """The rows: tuples of example indices. Packing: best fit (the fullest row with room) over a
    seed-derived order of the examples."""
    if not packing:
        return [(i,) for i in range(len(examples))]
    lengths = [len(e) for e in examples]
    shortest = min(lengths)
    order = np.random.default_rng([seed, 0]).permutation(len(examples))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free slots, row) of rows that can take the shortest example
    for i in order.tolist():
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k < len(room):
            free, row = room.pop(k)
            rows[row].append(i)
        else:
            free, row = seq_len, len(rows)
            rows.append([i])
        free -= lengths[i]
        if free >= shortest:
            bisect.insort(room, (free, row))
    return [tuple(r) for r in rows]


def steps_per_epoch(examples, batch_size: int, seq_len: int, seed: int, packing: bool = True) -> int:
    """Global batches in one epoch (the same every epoch): ceil(rows / batch_size)."""
    _check(examples, batch_size, seq_len, seed)
    return math.ceil(len(_layout(examples, seq_len, seed, packing)) / batch_size)


def _make_batch(rows, *, examples, seq_len: int, lo: int, hi: int) -> Batch:
    """Rows [lo, hi) of one global batch (tuples of example indices) -> numpy arrays."""
    rows = rows[lo:hi]
    shape = (len(rows), seq_len)
    b = Batch(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.float32),
              np.zeros(shape, np.int32), np.zeros(shape, np.int32))
    for r, row in enumerate(rows):
        start = 0
        for s, i in enumerate(row, 1):
            ex = examples[i]
            n, end = len(ex), start + len(ex)
            b.inputs[r, start:end] = ex.ids
            b.targets[r, start:end - 1] = ex.ids[1:]
            b.weights[r, start:end - 1] = ex.loss_mask[1:]
            b.positions[r, start:end] = np.arange(n)
            b.segment_ids[r, start:end] = s
            start = end
    return b


class DataIterator:
    """Iterator of `Batch` with `get_state()` (a JSON-serializable dict) and `set_state(state)`."""

    def __init__(self, dataset: grain.MapDataset, fingerprint: dict, read_options: grain.ReadOptions,
                 steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch  # global batches an epoch
        self._iter = dataset.to_iter_dataset(read_options).__iter__()
        self._fingerprint = fingerprint

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """The position: batches taken so far (grain's state) and what the data were."""
        return {"grain": self._iter.get_state(), **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues after the batch where `state` was taken (shard_index/count may differ)."""
        theirs = {k: state.get(k) for k in self._fingerprint}
        if theirs != self._fingerprint or "grain" not in state:
            raise ValueError(f"the data state was taken from other data or arguments: {theirs} (now "
                             f"{self._fingerprint})")
        self._iter.set_state(state["grain"])


def _seed32(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def make_iterator(examples, *, batch_size: int, seq_len: int, seed: int, packing: bool = True,
                  shard_index: int = 0, shard_count: int = 1, num_epochs: int | None = None,
                  prefetch: int = 2, batch_fn=None) -> DataIterator:
    """Batches of `examples` in a seed-determined order, `num_epochs` epochs (None: forever).

    `batch_size` is the global batch; this process gets its rows [i*B/n, (i+1)*B/n) for
    shard_index i of shard_count n, so the global batch does not depend on the process count.
    `prefetch`: batches prepared ahead in a background thread (0: none). `batch_fn`: what turns rows into a
    batch, with `_make_batch`'s signature (default: it)."""
    _check(examples, batch_size, seq_len, seed, shard_index, shard_count)
    layout = _layout(examples, seq_len, seed, packing)
    steps = math.ceil(len(layout) / batch_size)
    epoch = grain.MapDataset.source(layout).shuffle(seed=_seed32(seed, 1))
    pad = steps * batch_size - len(layout)
    if pad:  # empty rows close each epoch's last batch
        epoch = grain.MapDataset.concatenate([epoch, grain.MapDataset.source([()] * pad)])
    per = batch_size // shard_count
    make = functools.partial(batch_fn or _make_batch, examples=examples, seq_len=seq_len,
                             lo=shard_index * per, hi=(shard_index + 1) * per)
    if num_epochs is None:  # "forever": grain's infinite length (sys.maxsize) overflows its batch length
        num_epochs = 2**62 // len(epoch)
    dataset = epoch.repeat(num_epochs).batch(batch_size, batch_fn=make)
    fingerprint = {"examples": len(examples), "tokens": int(sum(len(e) for e in examples)),
                   "batch_size": batch_size, "seq_len": seq_len, "seed": int(seed), "packing": bool(packing),
                   "rows": len(layout)}
    options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=max(prefetch, 1))
    return DataIterator(dataset, fingerprint, options, steps)
