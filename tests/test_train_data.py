"""gemma.train.data: rendering against the chat template, loss masks, packing, order, resumable state,
sharding and every kind of bad input. Real tokenizer, no model."""

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import FIXTURES
from gemma.chat import format_turn
from gemma.train import data

SAMPLE = FIXTURES / "finetune" / "sample.jsonl"
EOT = 106


def _synthetic(n=37, seed=0, lo=2, hi=40):
    """Examples with distinct random ids (so each one can be found again in a batch) and random masks."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = int(rng.integers(lo, hi))
        ids = np.concatenate([[2, 1000 + k], rng.integers(3, 999, m - 2)]).astype(np.int32)
        mask = rng.random(m) < 0.6
        mask[0] = False
        out.append(data.Example(ids, mask))
    return out


def _write(tmp_path, *lines):
    """A JSONL file of `lines` (strings as they are, anything else as JSON)."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _segments(batch):
    """(inputs, targets, weights, positions) of every example in a batch, in row order."""
    out = []
    for r in range(batch.inputs.shape[0]):
        seg = batch.segment_ids[r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment must be contiguous"
            out.append(tuple(getattr(batch, f)[r, idx] for f in ("inputs", "targets", "weights", "positions")))
    return out


def _same(a, b):
    return all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))


# ---------------------------------------------------------------- rendering


def test_multi_turn_chat_with_system(tokenizer_270m):
    tok = tokenizer_270m
    record = {"messages": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": "What is the capital of France?"},
                           {"role": "model", "content": "Paris."},
                           {"role": "user", "content": "And of Italy?"},
                           {"role": "assistant", "content": "Rome, of course."}]}
    ex = data.render(record, tok)
    p1 = tok.encode(format_turn("What is the capital of France?", first=True, system="Answer briefly."),
                    add_bos=False)
    r1 = tok.encode("Paris.", add_bos=False)
    p2 = tok.encode(format_turn("And of Italy?", first=False), add_bos=False)
    r2 = tok.encode("Rome, of course.", add_bos=False)
    assert p2[0] == EOT  # the second turn opens with the first reply's <end_of_turn>
    want_ids = [tok.bos_id] + p1 + r1 + p2 + r2 + [EOT]
    want_mask = [False] * (1 + len(p1)) + [True] * len(r1) + [True] + [False] * (len(p2) - 1) \
        + [True] * len(r2) + [True]
    assert ex.ids.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert ex.ids.tolist() == want_ids
    assert ex.loss_mask.tolist() == want_mask
    # the text is the template ChatSampler feeds, and the mask holds exactly the replies and their 106s
    assert tok.decode(ex.ids) == (format_turn("What is the capital of France?", first=True,
                                              system="Answer briefly.") + "Paris." +
                                  format_turn("And of Italy?", first=False) + "Rome, of course.<end_of_turn>")
    assert ex.ids[ex.loss_mask].tolist() == r1 + [EOT] + r2 + [EOT]


def test_prompt_response_and_alias(tokenizer_270m):
    tok = tokenizer_270m
    ex = data.render({"prompt": "Say hi", "response": "Hi!"}, tok)
    p = tok.encode("<start_of_turn>user\nSay hi<end_of_turn>\n<start_of_turn>model\n", add_bos=False)
    r = tok.encode("Hi!", add_bos=False)
    assert ex.ids.tolist() == [2] + p + r + [EOT]
    assert ex.loss_mask.tolist() == [False] * (1 + len(p)) + [True] * (len(r) + 1)
    for role in ("model", "assistant"):
        same = data.render({"messages": [{"role": "user", "content": "Say hi"},
                                         {"role": role, "content": "Hi!"}]}, tok)
        assert same.ids.tolist() == ex.ids.tolist() and same.loss_mask.tolist() == ex.loss_mask.tolist()


def test_text(tokenizer_270m):
    ex = data.render({"text": "Once upon a time"}, tokenizer_270m)
    assert ex.ids.tolist() == [2] + tokenizer_270m.encode("Once upon a time", add_bos=False)
    assert ex.loss_mask.tolist() == [False] + [True] * (len(ex.ids) - 1)


def test_read_and_load(tokenizer_270m):
    records = data.read_jsonl(SAMPLE)
    assert len(records) == 4 and records[2] == {"text": "The quick brown fox jumps over the lazy dog."}
    examples, counts = data.load_examples(SAMPLE, tokenizer_270m, seq_len=512)
    assert [e.ids.tolist() for e in examples] == [data.render(r, tokenizer_270m).ids.tolist() for r in records]
    assert counts == {"examples": 4, "truncated": 0, "dropped": 0, "tokens": sum(len(e) for e in examples),
                      "loss_tokens": sum(int(e.loss_mask.sum()) for e in examples)}
    lengths = [len(e) for e in examples]
    limit = sorted(lengths)[1]  # two examples fit exactly (n tokens fit n positions), two do not
    n_long = sum(n > limit for n in lengths)
    kept, c = data.load_examples(SAMPLE, tokenizer_270m, seq_len=limit, long="drop")
    assert c["examples"] == 4 - n_long and c["dropped"] == n_long and c["truncated"] == 0
    cut, c = data.load_examples(SAMPLE, tokenizer_270m, seq_len=limit, long="truncate")
    assert max(len(e) for e in cut) == limit and c["truncated"] + c["dropped"] == n_long
    for e, full in zip(cut, (e for e in examples if e.loss_mask[:limit].any())):
        assert e.ids.tolist() == full.ids[:limit].tolist() and e.loss_mask.tolist() == full.loss_mask[:limit].tolist()


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("packing", [True, False])
def test_batches_hold_every_example_once_per_epoch(packing):
    examples = _synthetic()
    B, L = 4, 48
    steps = data.steps_per_epoch(examples, B, L, seed=3, packing=packing)
    batches = list(data.make_iterator(examples, batch_size=B, seq_len=L, seed=3, packing=packing, num_epochs=2))
    assert len(batches) == 2 * steps
    assert data.make_iterator(examples, batch_size=B, seq_len=L, seed=3, packing=packing).steps_per_epoch == steps
    by_ids = {tuple(e.ids.tolist()): e for e in examples}
    for epoch in range(2):
        seen = collections.Counter()
        for b in batches[epoch * steps:(epoch + 1) * steps]:
            assert all(x.shape == (B, L) for x in b)
            assert [x.dtype for x in b] == [np.int32, np.int32, np.float32, np.int32, np.int32]
            pad = b.segment_ids == 0
            assert not (b.inputs[pad].any() or b.targets[pad].any() or b.weights[pad].any() or b.positions[pad].any())
            # padding is at the end of each row; without packing a row holds one example
            assert all(np.all(np.diff(pad[r].astype(int)) >= 0) for r in range(B))
            if not packing:
                assert b.segment_ids.max() <= 1
            for inputs, targets, weights, positions in _segments(b):
                ex = by_ids[tuple(inputs.tolist())]
                seen[tuple(inputs.tolist())] += 1
                assert positions.tolist() == list(range(len(ex)))
                assert targets.tolist() == ex.ids[1:].tolist() + [0]      # nothing crosses a boundary
                assert weights.tolist() == ex.loss_mask[1:].tolist() + [0.0]
        assert seen == collections.Counter({k: 1 for k in by_ids}), f"epoch {epoch}"
    if packing:
        assert any(b.segment_ids.max() > 1 for b in batches)
        assert steps < data.steps_per_epoch(examples, B, L, seed=3, packing=False)
    # epochs are shuffled differently
    assert not all(_same(a, b) for a, b in zip(batches[:steps], batches[steps:]))


def test_weights_of_a_rendered_chat(tokenizer_270m):
    ex = data.render(json.loads(SAMPLE.read_text().splitlines()[0]), tokenizer_270m)
    b = next(data.make_iterator([ex], batch_size=1, seq_len=len(ex) + 5, seed=0))
    n = len(ex)
    assert b.weights[0, :n - 1].tolist() == ex.loss_mask[1:].astype(float).tolist()
    assert b.weights[0, n - 1:].sum() == 0 and b.segment_ids[0].tolist() == [1] * n + [0] * 5
    assert b.targets[0, np.flatnonzero(b.weights[0])].tolist() == ex.ids[ex.loss_mask].tolist()


def test_seed_determines_order():
    examples = _synthetic()
    take = lambda seed: [next(it) for it in [data.make_iterator(examples, batch_size=4, seq_len=48, seed=seed)]
                         for _ in range(6)]
    a, b, c = take(5), take(5), take(6)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", [True, False])
def test_state_round_trip_mid_epoch_and_across_epochs(packing):
    examples = _synthetic()
    kw = dict(batch_size=4, seq_len=48, seed=7, packing=packing)
    steps = data.steps_per_epoch(examples, 4, 48, 7, packing)
    it = data.make_iterator(examples, **kw)
    run = [next(it) for _ in range(2 * steps + 3)]
    for k in (0, 1, steps - 1, steps, steps + 2):
        it = data.make_iterator(examples, **kw)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        fresh = data.make_iterator(examples, **kw)
        fresh.set_state(state)
        for j in range(k, k + steps + 1):
            assert _same(next(fresh), run[j]), (k, j)


def test_state_restores_in_a_fresh_process(tmp_path):
    kw = dict(batch_size=4, seq_len=48, seed=11)
    it = data.make_iterator(_synthetic(), **kw)
    steps = data.steps_per_epoch(_synthetic(), 4, 48, 11)
    for _ in range(steps - 1):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(FIXTURES.parent)!r})
        from test_train_data import _synthetic
        from gemma.train import data
        it = data.make_iterator(_synthetic(), **{kw!r})
        it.set_state(json.loads({json.dumps(state)!r}))
        np.savez(sys.argv[1], *[np.stack(next(it)) for _ in range(3)])
    """)
    path = tmp_path / "b.npz"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=str(FIXTURES.parent.parent))
    got = np.load(path)
    for j, b in enumerate(want):
        assert np.array_equal(got[f"arr_{j}"], np.stack(b))


def test_state_checks_its_data():
    it = data.make_iterator(_synthetic(), batch_size=4, seq_len=48, seed=0)
    next(it)
    state = it.get_state()
    other = data.make_iterator(_synthetic(), batch_size=4, seq_len=48, seed=1)
    with pytest.raises(ValueError, match="other data or arguments"):
        other.set_state(state)


@pytest.mark.parametrize("count", [2, 4])
def test_shards_are_rows_of_the_global_batch(count):
    examples = _synthetic()
    kw = dict(batch_size=8, seq_len=48, seed=2)
    whole = data.make_iterator(examples, **kw)
    shards = [data.make_iterator(examples, shard_index=i, shard_count=count, **kw) for i in range(count)]
    for _ in range(5):
        g = next(whole)
        parts = [next(s) for s in shards]
        for f in data.Batch._fields:
            assert np.array_equal(np.concatenate([getattr(p, f) for p in parts]), getattr(g, f))
    # a state taken by one process count restores in another (the position is in global batches)
    one = data.make_iterator(examples, shard_index=1, shard_count=count, **kw)
    one.set_state(whole.get_state())
    per = 8 // count
    assert _same(next(one), data.Batch(*(x[per:2 * per] for x in next(whole))))


def test_iterator_arguments():
    examples = _synthetic()
    with pytest.raises(ValueError, match="multiple of shard_count"):
        data.make_iterator(examples, batch_size=6, seq_len=48, seed=0, shard_count=4)
    with pytest.raises(ValueError, match="more than seq_len=8"):
        data.make_iterator(examples, batch_size=4, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="no examples"):
        data.make_iterator([], batch_size=4, seq_len=8, seed=0)


# ---------------------------------------------------------------- bad input


BAD = [
    ('{"text": "fine"}\n{"text": "broken"', r"d\.jsonl:2: malformed JSON"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"d\.jsonl:1: messages\[1\]: unknown role 'bot'; expected one of system, user, model, assistant"),
    ({"text": "a", "source": "web"}, r"unknown field 'source'; expected the fields \{'messages'\}, "
                                     r"\{'prompt', 'response'\} or \{'text'\}"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "model", "content": "b"}]},
     r"messages\[0\]: unknown field 'name'; expected 'role' and 'content'"),
    ({"messages": [{"role": "user"}, {"role": "model", "content": "b"}]}, r"messages\[0\]: missing 'content'"),
    ({"prompt": "a"}, r"the fields \['prompt'\] match no format"),
    ({"prompt": "a", "text": "b"}, r"match no format"),
    ([1, 2], r"expected a JSON object"),
    ({"prompt": "a", "response": ""}, r"'response' is empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "model", "content": "  "}]},
     r"messages\[1\]\.content is empty"),
    ({"text": 3}, r"'text' must be a string, got int"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "model", "content": "b"}]},
     r"messages\[0\]\.content must be a string, got list"),
    ({"messages": []}, r"'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "a"}]}, r"last turn must be a model turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "model", "content": "b"},
                   {"role": "user", "content": "c"}]}, r"last turn must be a model turn"),
    ({"messages": [{"role": "system", "content": "s"}]}, r"last turn must be a model turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "model", "content": "b"}]}, r"messages\[1\] is a system turn .* may only come first"),
    ({"messages": [{"role": "model", "content": "a"}]}, r"messages\[0\] is a model turn where a user turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "model", "content": "c"}]}, r"messages\[1\] is a user turn where a model turn"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_record(tmp_path, line, message):
    path = _write(tmp_path, line)
    with pytest.raises(ValueError, match=message) as e:
        data.read_jsonl(path)
    assert str(e.value).startswith(str(path) + ":")
    if not isinstance(line, str):
        with pytest.raises(ValueError, match=message.replace(r"d\.jsonl:1: ", "")):
            data.render(line, None)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"empty\.jsonl: no examples"):
        data.read_jsonl(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        data.read_jsonl(path)


def test_too_long_under_error(tmp_path, tokenizer_270m):
    lengths = [len(e) for e in data.load_examples(SAMPLE, tokenizer_270m, seq_len=512)[0]]
    with pytest.raises(ValueError, match=rf"sample\.jsonl:1: the example has {lengths[0]} tokens, more than "
                                         rf"seq_len={lengths[0] - 1}"):
        data.load_examples(SAMPLE, tokenizer_270m, seq_len=lengths[0] - 1, long="error")
    path = _write(tmp_path, {"text": "short"}, "", {"text": "one two three four five six"})
    n = len(data.render({"text": "one two three four five six"}, tokenizer_270m))
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: the example has {n} tokens, more than seq_len=5"):
        data.load_examples(path, tokenizer_270m, seq_len=5, long="error")
    with pytest.raises(ValueError, match="long='cut'; expected one of"):
        data.load_examples(SAMPLE, tokenizer_270m, seq_len=512, long="cut")
