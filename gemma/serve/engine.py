"""Continuous batching on one compact KV cache: S slots, requests join and leave between decode steps.

    engine = Engine(model, tokenizer, max_batch=16, max_len=4096)
    outs = engine.generate_batch(["The capital of France is", "1, 2, 3,"], max_tokens=16)
    gen = engine.submit(Request(ids, max_tokens=32, temperature=1.0, seed=0), listener=print)
    engine.close()

A background thread owns the device state. Each loop it swaps in new weights if
the learner gave some, admits queued requests into free slots, prefills joining
prompts (up to prefill_chunk tokens in all, so that many short prompts joining
together start decoding in the same step; with prefill_rows > 1 one-chunk prompts
together in one Sampler.prefill call of power-of-two rows, else each batch-1), copies
each finished prefill row into its slot(s), and runs one jitted decode step over
all S rows with per-row positions, sampling parameters and keys. Shapes are fixed
(S rows, max_len slots, bucketed prefill rows and widths), so nothing compiles
after warm-up. A prompt prefilled with others (prefill_rows > 1) goes through products of more rows
than alone, so its logits may differ from Sampler.generate's in the last bits
(greedy ids agree but for near-ties); a batch queued together (generate_batch) is
scheduled the same way on every run, so its seeded draws are reproducible.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import threading
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.cache import Cache
from gemma.config import VOCAB_SIZE
from gemma.sampler import (IncrementalText, Sampler, SamplingParams, _bucket, check_max_len, feed,
                           ids_before, sample_rows)
from gemma.serve.metrics import Metrics
from gemma.tokenizer import Tokenizer
from gemma.transformer import ModelKey, Transformer
import kernels
from kernels import cpu_decode

TOP_LOGPROBS = 5  # most alternatives a token's logprobs may list (the OpenAI API's limit too)
DEFAULT_MAX_LEN = 4096
_IDLE_WAIT_S = 0.05


class StaleWeights(RuntimeError):
    """A request made against weights older than the engine's max_staleness allows."""


class EngineClosed(RuntimeError):
    """The engine was closed before the request finished."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids, <bos> included) and how to continue it.

    n: independent continuations (each takes a slot). seed: the draws of choice i depend
    on (seed, i) only, never on batch mates; None picks one at random. stop: strings that
    end a choice (cut before them); stop_ids: ids that end it (None: <eos> and <end_of_turn>).
    logprobs: None, or how many alternatives (0..5) to report with each token's logprob.
    weights_version: the version the caller acts on (checked against max_staleness).
    """

    ids: tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] | None = None
    n: int = 1
    logprobs: int | None = None
    weights_version: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(int(i) for i in self.ids))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not self.ids:
            raise ValueError("the prompt is empty; give at least one token id")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # raises on bad values
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an int in [0, {TOP_LOGPROBS}] or None, got {self.logprobs!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must hold non-empty strings, got {self.stop!r}")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Event:
    """What a listener receives: a choice's next token (`token` >= 0, with its text piece, which may
    be empty while a UTF-8 character is incomplete) or its end (`finish_reason` set: "stop", "length",
    "cancelled" or "error")."""

    index: int
    text: str = ""
    token: int = -1
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None
    weights_version: int = 0


@dataclasses.dataclass
class Choice:
    """One continuation as it stands (final once `finish_reason` is set)."""

    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_version: int | None = None  # weights versions the choice was generated under
    last_version: int | None = None


class Generation:
    """The handle of a submitted request: its choices, `wait()`, `cancel()`, streamed `events()`."""

    _ids = itertools.count()

    def __init__(self, request: Request, listener: Callable[[Event], None] | None, tokenizer: Tokenizer):
        self.request = request
        self.id = next(self._ids)
        self.choices = [Choice(i) for i in range(request.n)]
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self._listener = listener
        self._done = threading.Event()
        self._cancelled = False
        self._texts = [IncrementalText(tokenizer, request.stop) for _ in range(request.n)]

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Ends every unfinished choice within one decode step; their slots are freed."""
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> list[Choice]:
        """The choices once all have finished; raises the engine's error, or TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.choices

    def _emit(self, event: Event) -> None:
        if self._listener is not None:
            self._listener(event)


@dataclasses.dataclass
class _Slot:
    gen: Generation
    index: int  # which choice of gen


@dataclasses.dataclass
class _Prefill:
    gen: Generation
    slots: list[int]
    width: int  # the prompt's bucket width
    chunk: int  # tokens per chunk (the width, at most prefill_chunk)
    remaining: int  # chunks still to run
    version: int
    chunks: Iterator | None = None  # a prompt of several chunks: its batch-1 prefill, once started


class Engine:
    """Continuous batching over `max_batch` slots of one compact cache of `max_len` tokens per slot.

    Args:
      model, tokenizer: as for `Sampler`.
      max_batch: S, the slots (rows decoded together).
      max_len: prompt + max_tokens per request (default: min(4096, the model's context)).
      prefill_chunk: prompt tokens prefilled between two decode steps (a longer prompt: in chunks of this,
        as `Sampler`'s; shorter prompts joining together: as many as fit in it).
      max_wait_ms: an idle engine waits this long for more requests before it starts a partial batch.
      max_staleness: refuse requests made against weights more than this many versions old.
      weights_version: the version of the weights given.
      cache_dtype: of the KV cache (default: the model's dtype).
      prefill_rows: most one-chunk prompts prefilled in one call (default 1: each alone, laid out as
        Sampler.generate lays it out, bit for bit; more: fewer calls, one program per power-of-two row count,
        bits as a batched prefill's; on the 2-core CPU 16 at once saved no measurable time, RESULTS.md).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, max_wait_ms: float = 5.0, max_staleness: int | None = None,
                 weights_version: int = 0, cache_dtype=None, prefill_rows: int = 1):
        if not _is_int(max_batch) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if not isinstance(max_wait_ms, (int, float)) or max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0, got {max_wait_ms!r}")
        if not _is_int(prefill_rows) or prefill_rows < 1:
            raise ValueError(f"prefill_rows must be an int >= 1, got {prefill_rows!r}")
        self.prefill_rows = int(prefill_rows)
        if max_staleness is not None and (not _is_int(max_staleness) or max_staleness < 0):
            raise ValueError(f"max_staleness must be an int >= 0 or None, got {max_staleness!r}")
        context = model.config.max_context
        max_len = check_max_len(min(DEFAULT_MAX_LEN, context) if max_len is None else max_len, context)
        self.sampler = Sampler(model, tokenizer, max_len=max_len, prefill_chunk=prefill_chunk,
                               cache_dtype=cache_dtype)
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch, self.max_len = int(max_batch), max_len
        self.max_wait_s = max_wait_ms / 1000
        self.max_staleness = max_staleness
        self.weights_version = int(weights_version)
        self.metrics = Metrics()
        self._state = self.sampler._state
        # the decode step takes the weights as a flat list under a static key hashed once: flattening the
        # nnx.State and hashing the GraphDef on every call cost ~3 ms of a ~25 ms one-row step (loaded machine)
        self._model, self._leaves = self.sampler._model_key, self.sampler._leaves
        s = self.max_batch
        self._cache = self.sampler.new_cache(s, max_len)
        self._logits = jnp.zeros((s, self.config.vocab_size), jnp.float32)
        self._keys = np.zeros((s, 2), np.uint32)
        self._counts = np.zeros((s,), np.int32)
        self._temperature = np.zeros((s,), np.float32)
        self._top_k = np.zeros((s,), np.int32)
        self._top_p = np.ones((s,), np.float32)
        self._slots: list[_Slot | None] = [None] * s
        self._reserved: set[int] = set()
        self._queue: collections.deque[Generation] = collections.deque()
        self._prefills: collections.deque[_Prefill] = collections.deque()
        self._pending_weights: tuple | None = None
        self._weights_applied = threading.Condition()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, request: Request, listener: Callable[[Event], None] | None = None) -> Generation:
        """Queues `request`; `listener(event)` (called from the engine's thread: keep it quick) sees each
        token and each choice's end. Raises ValueError when it cannot fit, StaleWeights when too old."""
        gen = self._generation(request, listener)
        self._enqueue([gen])
        return gen

    def _generation(self, request: Request, listener) -> Generation:
        """The handle of `request`, once it is checked against the engine's limits."""
        need = len(request.ids) + request.max_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({len(request.ids)} tokens) + max_tokens ({request.max_tokens}) = {need} "
                             f"exceeds the engine's max_len of {self.max_len} tokens")
        if request.n > self.max_batch:
            raise ValueError(f"n ({request.n}) exceeds max_batch ({self.max_batch}), the slots decoded together")
        self.sampler.encode_prompt(list(request.ids))  # ids within the vocabulary
        self._check_staleness(request)
        return Generation(request, listener, self.tokenizer)

    def _enqueue(self, gens: list[Generation]) -> None:
        """Queues `gens` together: the loop admits them in one pass (a batch's schedule, and so its sampled
        draws, never depends on how fast the caller submitted)."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            self._queue.extend(gens)
            self.metrics.queued = len(self._queue)
            self._cond.notify_all()

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], max_tokens: int = 16, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] | None = None,
                       stop: Sequence[str] = (), logprobs: int | None = None,
                       timeout: float | None = None, stop_ids: Sequence[int] | None = None) -> list[Choice]:
        """One choice per prompt (text gets <bos>; id lists are taken as given), all through the engine, queued
        together (so a seeded batch draws the same ids however fast this thread runs). `seed`: one per prompt,
        or an int s meaning s + i for prompt i. `stop_ids`: ids that end a choice (None: <eos>, <end_of_turn>)."""
        seeds = (list(seed) if isinstance(seed, (list, tuple)) else
                 [None if seed is None else seed + i for i in range(len(prompts))])
        if len(seeds) != len(prompts):
            raise ValueError(f"seed must be an int or one per prompt ({len(prompts)}), got {len(seeds)}")
        stop_ids = None if stop_ids is None else tuple(int(i) for i in stop_ids)
        gens = [self._generation(Request(tuple(self.sampler.encode_prompt(p)), max_tokens, temperature, top_k, top_p,
                                         s, tuple(stop), stop_ids, logprobs=logprobs), None)
                for p, s in zip(prompts, seeds)]
        self._enqueue(gens)
        return [g.wait(timeout)[0] for g in gens]

    def update_weights(self, params, version: int, timeout: float | None = 60.0) -> None:
        """Swaps in new weights (an `nnx.State` of the model, or a `Transformer` of the same config) between
        decode steps; returns once they are in use: any request submitted after this returns runs on them.
        `version` must exceed the current one. The engine keeps its own copy of every array it does not
        already hold, so the caller may donate or drop its arrays afterwards (a trainer's next step does)."""
        if not _is_int(version) or version <= self.weights_version:
            raise ValueError(f"version must be an int above the current {self.weights_version}, got {version!r}")
        state = nnx.split(params)[1] if isinstance(params, nnx.Module) else params
        want = jax.tree.structure(self._state)
        if jax.tree.structure(state) != want:
            raise ValueError("the new weights' tree does not match the served model's (same config and "
                             "modules expected: nnx.split(model)[1] or the model itself)")
        for new, old in zip(jax.tree.leaves(state), jax.tree.leaves(self._state)):
            if new.shape != old.shape:
                raise ValueError(f"a new weight has shape {new.shape} where the served model's has {old.shape}")
        state = jax.tree.map(_own, state, self._state)
        with self._cond:
            self._pending_weights = (state, int(version))
            self._cond.notify_all()
        with self._weights_applied:
            if not self._weights_applied.wait_for(lambda: self.weights_version >= version, timeout):
                raise TimeoutError(f"the engine did not take weights version {version} within {timeout} s")

    def warmup(self) -> None:
        """Compiles every program requests use (each prefill width, the decode step) with throwaway requests."""
        chunk, n = self.sampler.prefill_chunk, 1  # n: the shortest prompt of each width (+ 1 token fits)
        while n + 1 <= self.max_len and (width := _bucket(n, chunk)) <= 2 * chunk:
            rows = 1  # each row count prompts of this width are prefilled in, by the fewest prompts that take it
            most = min(self.max_batch, self.prefill_rows)
            while rows == 1 or (rows * width <= chunk and rows // 2 + 1 <= most):
                gens = [self._generation(Request((self.tokenizer.bos_id,) * n, max_tokens=1, temperature=1.0,
                                                 top_p=0.5, logprobs=1), None) for _ in range(rows // 2 + 1)]
                self._enqueue(gens)
                for g in gens:
                    g.wait()
                rows *= 2
            n = width + 1
        # every decode width: S requests fill the slots one by one, then leave from the highest slot down
        s = self.max_batch
        gens = [self.submit(Request((self.tokenizer.bos_id,), max_tokens=s - i + 1, temperature=1.0, top_k=2,
                                    stop_ids=())) for i in range(s)]
        for g in gens:
            g.wait()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots) + len(self._reserved)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop; unfinished requests end with EngineClosed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the loop
    def _check_staleness(self, request: Request) -> None:
        if self.max_staleness is None or request.weights_version is None:
            return
        if self.weights_version - request.weights_version > self.max_staleness:
            raise StaleWeights(f"the request was made against weights version {request.weights_version}; the "
                               f"server is at {self.weights_version} and accepts at most {self.max_staleness} "
                               f"version(s) behind")

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    break
                self._apply_weights()
                self._admit()
                idle = not self._prefills and not any(self._slots)
                if idle:
                    self._cond.wait(self._wait_time())
                    continue
            try:
                self._cancel_finished()
                spent = 0  # prompts that joined: up to prefill_chunk tokens of them before the next step, so
                while self._prefills and spent < self.sampler.prefill_chunk:  # decode runs on full batches
                    spent += self._advance_prefill()
                if any(self._slots):
                    self._step()
            except Exception as e:  # a failed device call: fail what was running, start over clean
                self._fail_all(e, queued=False)
                self._cache = self.sampler.new_cache(self.max_batch, self.max_len)
                self._logits = jnp.zeros_like(self._logits)
        self._fail_all(EngineClosed("the engine was closed"), queued=True)

    def _wait_time(self) -> float:
        if self._queue:  # an idle engine holding a partial batch: until the oldest has waited max_wait
            return max(0.0, self._queue[0].submitted + self.max_wait_s - time.monotonic())
        return _IDLE_WAIT_S

    def _apply_weights(self) -> None:
        if self._pending_weights is None:
            return
        state, version = self._pending_weights
        self._pending_weights = None
        self.sampler._use_state(state)
        self._state, self._leaves = state, self.sampler._leaves
        with self._weights_applied:
            self.weights_version = version
            self._weights_applied.notify_all()

    def _admit(self) -> None:
        """Moves queued requests into free slots (called under the lock). An idle engine waits up to
        max_wait for a full batch; a busy one admits at once."""
        free = [i for i, s in enumerate(self._slots) if s is None and i not in self._reserved]
        busy = any(self._slots) or self._prefills
        if self._queue and not busy:
            wanted = sum(g.request.n for g in self._queue)
            if wanted < len(free) and self._wait_time() > 0:
                return
        while self._queue and self._queue[0].request.n <= len(free):
            gen = self._queue.popleft()
            if gen.cancelled:
                self._finish_all(gen, "cancelled")
                continue
            try:
                self._check_staleness(gen.request)
            except StaleWeights as e:
                self._fail(gen, e)
                continue
            slots, free = free[:gen.request.n], free[gen.request.n:]
            self._reserved.update(slots)
            width = _bucket(len(gen.request.ids), self.sampler.prefill_chunk)
            chunk = min(width, self.sampler.prefill_chunk)
            self._prefills.append(_Prefill(gen, slots, width, chunk, -(-width // chunk), self.weights_version))
        self.metrics.queued = len(self._queue)
        self.metrics.running = self.running

    def _advance_prefill(self) -> int:
        """Runs one prefill call and returns the tokens it computed (padding included): the next chunk of a
        prompt longer than one chunk (batch-1, in chunks, as Sampler.prefill), or else the one-chunk prompts
        at the head of the line together, as many as fit in prefill_chunk tokens at a power-of-two row count
        (left-padded to the widest, as Sampler.prefill pads a batch; rows past the prompts are empty)."""
        for job in [j for j in self._prefills if j.gen.cancelled]:
            self._prefills.remove(job)
            self._reserved.difference_update(job.slots)
            self._finish_all(job.gen, "cancelled")
        if not self._prefills:
            return 0
        job = self._prefills[0]
        if job.remaining > 1 or job.chunks is not None:
            if job.chunks is None:
                job.version = self.weights_version
                job.chunks = self.sampler.prefill_chunks([list(job.gen.request.ids)],
                                                         self.sampler.new_cache(1, self.max_len))
            logits, rows = next(job.chunks)
            job.remaining -= 1
            if not job.remaining:
                self._prefills.popleft()
                self._start([job], rows, logits)
            return job.chunk
        group, width = [job], job.width
        for other in itertools.islice(self._prefills, 1, None):
            wider = max(width, other.width)
            if (other.remaining > 1 or len(group) == self.prefill_rows
                    or _rows(len(group) + 1) * wider > self.sampler.prefill_chunk):
                break
            group.append(other)
            width = wider
        for job in group:
            self._prefills.popleft()
            job.version = self.weights_version
        n = _rows(len(group))
        prompts = [list(job.gen.request.ids) for job in group] + [[]] * (n - len(group))
        logits, rows = self.sampler.prefill(prompts, self.sampler.new_cache(n, self.max_len))
        self._start(group, rows, logits)
        return n * width

    def _start(self, jobs: list[_Prefill], rows: Cache, logits: jax.Array) -> None:
        """Copies row r of the prefilled `rows` (and its last logits) into job r's slot(s); the slots start."""
        src, dst = np.full(self.max_batch, -1, np.int32), np.full(self.max_batch, -1, np.int32)
        pairs = [(r, slot) for r, job in enumerate(jobs) for slot in job.slots]
        src[:len(pairs)], dst[:len(pairs)] = zip(*pairs)
        self._cache, self._logits = _install(self._cache, self._logits, rows, logits, jnp.asarray(src),
                                             jnp.asarray(dst))
        for job in jobs:
            request = job.gen.request
            seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "little")
            base = jax.random.key(seed)
            for index, slot in enumerate(job.slots):
                self._keys[slot] = np.asarray(jax.random.key_data(jax.random.fold_in(base, index)))
                self._counts[slot] = 0
                self._temperature[slot] = request.temperature
                self._top_k[slot] = request.top_k or 0
                self._top_p[slot] = 1.0 if request.top_p is None else request.top_p
                self._slots[slot] = _Slot(job.gen, index)
                choice = job.gen.choices[index]
                choice.first_version = choice.last_version = job.version
            self._reserved.difference_update(job.slots)
            self.metrics.prompt_tokens += len(request.ids)

    def _step(self) -> None:
        # slots are taken lowest first; only a power-of-two prefix holding every active slot is computed
        rows = min(self.max_batch, 1 << max(i for i, s in enumerate(self._slots) if s is not None).bit_length())
        active = np.asarray([s is not None for s in self._slots[:rows]])
        want_top = any(s is not None and s.gen.request.logprobs for s in self._slots)
        token, chosen, top_values, top_ids, self._logits, self._cache = _decode_step(
            self._model, self._leaves, self._cache, self._logits, jnp.asarray(self._keys[:rows]),
            jnp.asarray(self._counts[:rows]), jnp.asarray(self._temperature[:rows]), jnp.asarray(self._top_k[:rows]),
            jnp.asarray(self._top_p[:rows]), jnp.asarray(active), jnp.bool_(want_top), rows)
        token, chosen = np.asarray(token), np.asarray(chosen)
        top_values, top_ids = (np.asarray(top_values), np.asarray(top_ids)) if want_top else (None, None)
        version = self.weights_version
        made = 0
        for slot in np.flatnonzero(active):
            s = self._slots[slot]
            gen, request, choice = s.gen, s.gen.request, s.gen.choices[s.index]
            self._counts[slot] += 1
            choice.last_version = version
            t = int(token[slot])
            stops = request.stop_ids if request.stop_ids is not None else self.sampler.stop_ids
            if t in stops:
                self._finish(slot, "stop")
                continue
            made += 1
            text = gen._texts[s.index]
            piece = text.push(t)
            top = ()
            if request.logprobs:
                top = tuple((int(i), float(v)) for i, v in zip(top_ids[slot, :request.logprobs],
                                                                top_values[slot, :request.logprobs]))
            choice.tokens.append(t)
            choice.logprobs.append(float(chosen[slot]))
            choice.top_logprobs.append(top)
            gen._emit(Event(s.index, piece, t, float(chosen[slot]), top, None, version))
            if text.stopped:
                self._finish(slot, "stop")
            elif len(choice.tokens) >= request.max_tokens:
                self._finish(slot, "length")
        self.metrics.step(int(active.sum()), made)
        self.metrics.running = self.running

    def _cancel_finished(self) -> None:
        for slot, s in enumerate(self._slots):
            if s is not None and s.gen.cancelled:
                self._finish(slot, "cancelled")

    def _finish(self, slot: int, reason: str) -> None:
        s = self._slots[slot]
        self._slots[slot] = None
        choice = s.gen.choices[s.index]
        text = s.gen._texts[s.index]
        piece = "" if reason == "cancelled" else text.flush()
        if text.stopped:  # a stop string: keep the ids whose text precedes it
            n = len(ids_before(self.tokenizer, choice.tokens, text.shown))
            choice.tokens, choice.logprobs, choice.top_logprobs = (choice.tokens[:n], choice.logprobs[:n],
                                                                   choice.top_logprobs[:n])
        choice.text = text.shown if text.stopped else text.shown + piece
        choice.finish_reason = reason
        s.gen._emit(Event(s.index, piece, finish_reason=reason, weights_version=self.weights_version))
        if all(c.finish_reason for c in s.gen.choices):
            self.metrics.finished(reason)
            s.gen._done.set()

    def _finish_all(self, gen: Generation, reason: str) -> None:
        for choice in gen.choices:
            if choice.finish_reason is None:
                choice.finish_reason = reason
                gen._emit(Event(choice.index, finish_reason=reason, weights_version=self.weights_version))
        self.metrics.finished(reason)
        gen._done.set()

    def _fail(self, gen: Generation, error: BaseException) -> None:
        gen.error = error
        self._finish_all(gen, "error")

    def _fail_all(self, error: BaseException, queued: bool) -> None:
        gens = {id(s.gen): s.gen for s in self._slots if s is not None}
        gens.update({id(p.gen): p.gen for p in self._prefills})
        if queued:
            gens.update({id(g): g for g in self._queue})
            self._queue.clear()
        self._slots = [None] * self.max_batch
        self._prefills.clear()
        self._reserved.clear()
        for gen in gens.values():
            if not gen.done:
                self._fail(gen, error)




def _own(new, old) -> jax.Array:
    """`new` as the engine keeps it: `old` itself when they are the same array, else an array of old's dtype and
    placement that no one else holds (a copy when `new` already is one)."""
    if new is old:
        return old
    mine = (jnp.array(new, copy=True) if isinstance(new, jax.Array) and new.dtype == old.dtype
            else jnp.asarray(new, old.dtype))
    return jax.device_put(mine, old.sharding) if isinstance(old, jax.Array) else mine  # old: host (numpy) weights


def _rows(n: int) -> int:
    """The rows of a prefill call for n prompts: the next power of two (one program per power)."""
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _install(cache: Cache, logits: jax.Array, rows: Cache, rows_logits: jax.Array, src: jax.Array, dst: jax.Array):
    """`cache` and `logits` with row dst[k] replaced by row src[k] of a prefilled `rows` and its last logits
    (int32 [S] each; -1: none), every array: k, v, int8 scales, length."""
    put = lambda big, part: cpu_decode.copy_rows(big, part, src, dst)  # in place (XLA:CPU widens a bf16 scatter)
    return jax.tree.map(put, cache, rows), put(logits, rows_logits)


@functools.partial(jax.jit, static_argnums=(0, 11), donate_argnums=(2, 3))
def _decode_step(served: ModelKey, leaves, cache, logits, keys, counts, temperature, top_k, top_p, active, want_top,
                 rows):
    """Samples each active row's next token from its logits with its own parameters and key
    (fold_in(key, tokens drawn so far)), feeds it, and returns (token, its logprob, top logprobs
    values and ids [rows, TOP_LOGPROBS] (zeros unless want_top), next logits, cache). Only the first
    `rows` (static) slots are computed: the per-row inputs hold those; the rest of the cache is kept."""
    whole, whole_logits = cache, logits
    model = served.merge(leaves)
    # On CPU the kernels (cache write, attention) take the first `rows` rows of the whole cache in place: a
    # Cache of the whole arrays with `rows` lengths. Elsewhere the prefix is sliced out and put back.
    in_place = cpu_decode.usable() and all(kernels.resolve(b.attn.impl) == "xla" for b in model.layers)
    if rows < cache.batch_size:
        cache = (Cache(cache.layers, cache.length[:rows]) if in_place else
                 jax.tree.map(lambda a: a[:rows], cache))  # every array, int8 scales included
        logits = cpu_decode.take_rows(logits, rows)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), counts)
    token = sample_rows(logits, keys, temperature, top_k, top_p)
    # logprob = logit - logsumexp: one reduction pass, not a [rows, 262144] log_softmax written out
    words = logits[:, :VOCAB_SIZE]
    lse = jax.nn.logsumexp(words, axis=-1)
    chosen = jnp.take_along_axis(words, token[:, None], axis=-1)[:, 0] - lse
    s = logits.shape[0]

    def top():
        values, ids = jax.lax.top_k(words, TOP_LOGPROBS)
        return values - lse[:, None], ids

    top_values, top_ids = jax.lax.cond(
        want_top, top, lambda: (jnp.zeros((s, TOP_LOGPROBS), words.dtype), jnp.zeros((s, TOP_LOGPROBS), jnp.int32)))
    logits, cache = feed(model, cache, token, ~active)
    if rows < whole.batch_size:
        put = lambda big, part: cpu_decode.put_rows(big, part, 0)  # in place (XLA:CPU widens a bf16 update)
        cache = (Cache(cache.layers, put(whole.length, cache.length)) if in_place else
                 jax.tree.map(put, whole, cache))
        logits = put(whole_logits, logits)
    return token, chosen, top_values, top_ids, logits, cache
