"""Sampling on the compact KV cache: chunked prefill, then one jitted decode loop.

    sampler = gemma.Sampler(model, tokenizer)
    out = sampler.generate("The capital of France is", max_new_tokens=16)
    out.text, out.tokens
    for piece in sampler.stream("Once upon a time", max_new_tokens=64): print(piece, end="")

Prompts are left-padded to a bucket length (powers of two, then multiples of
the prefill chunk) so new prompt lengths rarely recompile; decode runs as a
`lax.while_loop` that ends when every row has stopped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma.cache import Cache, init_cache
from gemma.config import VOCAB_SIZE
from gemma.tokenizer import Tokenizer
from gemma.transformer import ModelKey, Transformer

_MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """`text` and `tokens` (generated ids, stop token excluded): a str / list[int] for one
    prompt, lists of them for a list of prompts."""

    text: str | list[str]
    tokens: list[int] | list[list[int]]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_logits(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Next ids [B] from f32 logits [B, V]; ids >= 262144 (image tokens) are never drawn."""
    if params.greedy:
        return greedy_rows(logits)
    logits = logits[:, :VOCAB_SIZE] / params.temperature
    if params.top_k is not None:  # candidates: the k best, sorted
        values, ids = jax.lax.top_k(logits, min(params.top_k, logits.shape[-1]))
    else:
        ids = jnp.argsort(-logits, axis=-1) if params.top_p is not None else None
        values = jnp.take_along_axis(logits, ids, axis=-1) if ids is not None else logits
    if params.top_p is not None:
        values = _nucleus(values, params.top_p)
    choice = jax.random.categorical(key, values, axis=-1)
    if ids is None:
        return choice.astype(jnp.int32)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _nucleus(values: jax.Array, top_p) -> jax.Array:
    """Sorted (descending) logits [B, K] with all but the smallest prefix whose mass reaches
    `top_p` (a number or [B, 1]) set to -inf."""
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(before < top_p, values, -jnp.inf)


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array) -> jax.Array:
    """Next ids [B] from f32 logits [B, V] with per-row sampling parameters (traced arrays, so one
    compiled program serves any mix): temperature [B] (0: greedy), top_k [B] (0: off), top_p [B]
    (1: off), one key per row [B]. A row's draw depends on its own logits and key only.
    Sorting the vocabulary is paid only when some sampled row truncates."""
    greedy = greedy_rows(logits)
    logits = logits[:, :VOCAB_SIZE]
    sampled_rows = temperature > 0
    draw = _inverse_cdf

    def sampled():
        scaled = logits / jnp.where(sampled_rows, temperature, 1.0)[:, None]

        def truncated():
            ids = jnp.argsort(-scaled, axis=-1)
            values = jnp.take_along_axis(scaled, ids, axis=-1)
            rank = jnp.arange(values.shape[-1], dtype=jnp.int32)[None, :]
            values = jnp.where(rank < jnp.where(top_k > 0, top_k, values.shape[-1])[:, None], values, -jnp.inf)
            values = _nucleus(values, top_p[:, None])
            return jnp.take_along_axis(ids, draw(keys, values)[:, None], axis=-1)[:, 0].astype(jnp.int32)

        truncates = jnp.any(sampled_rows & ((top_k > 0) | (top_p < 1)))
        return jax.lax.cond(truncates, truncated, lambda: draw(keys, scaled).astype(jnp.int32))

    token = jax.lax.cond(jnp.any(sampled_rows), sampled, lambda: greedy)
    return jnp.where(sampled_rows, token, greedy)


def greedy_rows(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits[:, :VOCAB_SIZE], axis=-1) as int32 [B]; on CPU one pass of kernels.cpu_decode.argmax
    (the same ids: first of equal maxima), where XLA's argmax took 18 ms of a 16-row 270M step."""
    from kernels import cpu_decode

    if cpu_decode.usable() and logits.ndim == 2 and logits.dtype == jnp.float32:
        return cpu_decode.argmax(logits, VOCAB_SIZE)
    return jnp.argmax(logits[:, :VOCAB_SIZE], axis=-1).astype(jnp.int32)


def _inverse_cdf(keys: jax.Array, values: jax.Array) -> jax.Array:
    """One draw per row from softmax(values) [B, K], by one uniform per row against the running sum
    (not V Gumbel draws per row: generating those dominates a batched CPU step at 262k tokens)."""
    u = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys)  # in (0, 1]
    return categorical_from_uniform(u, values)


def categorical_from_uniform(u: jax.Array, values: jax.Array) -> jax.Array:
    """The first id with positive probability whose running sum reaches u * the total, per row: u [B]
    in (0, 1], values [B, K] logits (-inf: excluded). XLA's CPU/GPU cumsum is a parallel scan, so the
    running sum can step at zero-probability ids and dip by an ulp: only ids with p > 0 count, and the
    total is the largest of their sums, so some id always qualifies and excluded ids never do."""
    p = jax.nn.softmax(values.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(p, axis=-1)
    positive = p > 0
    total = jnp.max(jnp.where(positive, cdf, 0.0), axis=-1)
    hit = positive & (cdf >= (u * total)[:, None])
    return jnp.argmax(hit, axis=-1).astype(jnp.int32)


def feed(model: Transformer, cache: Cache, token: jax.Array, stopped: jax.Array) -> tuple[jax.Array, Cache]:
    """One decode step: each row's `token` [B] at its next position (rows `stopped` [B] write
    nothing and keep their length); returns next logits [B, V] and the cache."""
    positions = jnp.where(stopped, -1, cache.length)[:, None]
    logits, cache = model.extend(jnp.where(stopped, 0, token)[:, None], positions, cache, last_only=True)
    return logits[:, 0], cache


def _inline_images(prompt, images) -> list | None:
    """The images of a prompt given as a list mixing text and images, in order (None for text or ids)."""
    if not (isinstance(prompt, (list, tuple)) and any(not isinstance(p, (str, int, np.integer)) for p in prompt)):
        return None
    if images:
        raise ValueError("give images either inside the prompt list or in images=, not both")
    return [p for p in prompt if not isinstance(p, str)]


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(4,))
def _extend(model_key, leaves, tokens, positions, cache, images=None, fresh=False):
    model = model_key.merge(leaves)
    logits, cache = model.extend(tokens, positions, cache, last_only=True, images=images, fresh=fresh)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _feed_and_sample(model_key, leaves, cache, token, key, stop_ids, params):
    """One streamed decode step: feeds `token` [1] (nothing where it is a stop id) and samples the next
    from the logits it gives, as _decode_loop's body does. Returns (next token [1], cache, key)."""
    logits, cache = feed(model_key.merge(leaves), cache, token, jnp.isin(token, stop_ids))
    key, sub = jax.random.split(key)
    return sample_logits(logits, sub, params), cache, key


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _decode_loop(model_key, leaves, cache, logits, key, stop_ids, params, steps, max_new, done):
    """Samples up to `max_new` (<= `steps`, the compiled bucket) tokens per row; a row
    stops at any id in `stop_ids`. Returns ids [B, steps] (-1 after a row stopped) and the cache."""
    model = model_key.merge(leaves)
    out = jnp.full((logits.shape[0], steps), -1, jnp.int32)

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, key, done, out = carry
        key, sub = jax.random.split(key)
        token = sample_logits(logits, sub, params)
        stopped = done | jnp.isin(token, stop_ids)
        out = out.at[:, step].set(jnp.where(stopped, -1, token))
        logits, cache = feed(model, cache, token, stopped)
        return step + 1, cache, logits, key, stopped, out

    init = (jnp.int32(0), cache, logits, key, done, out)
    _, cache, logits, _, done, out = jax.lax.while_loop(cond, body, init)
    return out, cache


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index in `text` of the earliest occurrence of any stop string, or -1."""
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def ids_before(tokenizer: Tokenizer, ids: list[int], text: str) -> list[int]:
    """The shortest prefix of `ids` whose text starts with `text` (the ids kept before a stop string)."""
    n = next(n for n in range(len(ids) + 1) if tokenizer.decode(ids[:n]).startswith(text))
    return ids[:n]


def check_max_len(max_len: int | None, context: int) -> int:
    """`max_len`, or the model's `context` when None; a ValueError unless 1 <= max_len <= context
    (positions past the trained context are not meaningful, and a 50k prompt would run for minutes)."""
    if max_len is None:
        return int(context)
    if not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1 (or None for the model's context), got {max_len!r}")
    if max_len > context:
        raise ValueError(f"max_len {max_len} exceeds the model's context of {context} tokens "
                         f"(config.max_context); pass at most {context}")
    return int(max_len)


def _bucket(n: int, chunk: int) -> int:
    if n <= chunk:
        return max(_MIN_BUCKET, 1 << (n - 1).bit_length())
    return -(-n // chunk) * chunk


class Sampler:
    """Generates text from a Gemma 3 model on a compact KV cache.

    Args:
      model: a `gemma.Transformer` (e.g. from `checkpoints.load`).
      tokenizer: its `gemma.Tokenizer`.
      max_len: the longest prompt + generation, in tokens, per sequence
        (default: the model's context, `config.max_context`; at most that). Caches
        are sized to each call's need, not to max_len.
      prefill_chunk: prompts longer than this are prefilled in chunks.
      cache_dtype: dtype of the KV cache (default: the model's dtype).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_len: int | None = None,
                 prefill_chunk: int = 512, cache_dtype=None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_len = check_max_len(max_len, self.config.max_context)
        if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = int(prefill_chunk)
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype)
        self.stop_ids = (tokenizer.eos_id, tokenizer.end_of_turn_id)
        graphdef, state = nnx.split(model)
        self._model_key = ModelKey(graphdef, jax.tree.structure(state))
        self._use_state(state)

    def _use_state(self, state) -> None:
        """Decodes with `state` (the split model's, same tree structure) from now on."""
        self._state, self._leaves = state, jax.tree.leaves(state)

    # ------------------------------------------------------------------ pieces
    def prepare(self, prompt, images=None, add_bos: bool = True,
                pan_and_scan: bool = False) -> tuple[list[int], np.ndarray | None]:
        """Token ids and preprocessed pixels [I, S, S, 3] (or None) of one prompt.

        A prompt is text (with a `<start_of_image>` marker per image, the images
        passed in `images`), a list of token ids, or a list mixing text and images
        (PIL images or uint8 arrays). Each image becomes "\\n\\n", <start_of_image>,
        tokens_per_image soft tokens, <end_of_image>, "\\n\\n" (ids inserted around
        the marker's id, as the official gemma package does).

        `pan_and_scan=True`: each image whose Pan & Scan applies (vision.pan_and_scan)
        becomes "Here is the original image " + its block + " and here are some crops to
        help you see better " + the crops' blocks joined by " ", and its pixels are
        followed by the crops'; the text is written and tokenized as HF's Gemma3Processor
        does (text prompts: the wrapper text merges with the text around the marker).
        """
        if pan_and_scan:
            return self._prepare_pan_and_scan(prompt, images, add_bos)
        c = self.config
        inline = _inline_images(prompt, images)
        if inline is not None:
            images = inline
            ids = [self.tokenizer.bos_id] if add_bos else []
            for part in prompt:
                ids += self.tokenizer.encode(part, add_bos=False) if isinstance(part, str) else [c.boi_token_id]
        else:
            ids = self.encode_prompt(prompt, add_bos)
        images = list(images or [])
        markers = ids.count(c.boi_token_id)
        if not images and not markers:
            return ids, None
        self._check_images(markers, images)
        from vision import preprocess

        newline = self.tokenizer.encode("\n\n", add_bos=False)
        block = newline + [c.boi_token_id] + [c.image_token_id] * c.vision.tokens_per_image + [c.eoi_token_id] + newline
        expanded = []
        for i in ids:
            expanded += block if i == c.boi_token_id else [i]
        pixels = np.stack([preprocess(im, c.vision.image_size) for im in images])
        return expanded, pixels

    def _prepare_pan_and_scan(self, prompt, images, add_bos: bool) -> tuple[list[int], np.ndarray | None]:
        """`prepare` with Pan & Scan: pieces of text and id runs, adjacent text merged, then encoded."""
        c, tok = self.config, self.tokenizer
        slot = object()  # where an image goes
        inline = _inline_images(prompt, images)
        if inline is not None:
            images = inline
            pieces = [p if isinstance(p, str) else slot for p in prompt]
        elif isinstance(prompt, str):
            marker = tok.decode([c.boi_token_id])  # "<start_of_image>"
            if prompt.count(marker) != tok.encode(prompt, add_bos=False).count(c.boi_token_id):
                raise ValueError(f"cannot locate the image markers of the prompt (marker text {marker!r})")
            first, *rest = prompt.split(marker)
            pieces = [first]
            for text in rest:
                pieces += [slot, text]
        else:
            ids = self.encode_prompt(prompt, add_bos=False)
            pieces = []
            for i in ids:
                pieces.append(slot if i == c.boi_token_id else [i])
            add_bos = False  # a list of ids is taken as given
        images = list(images or [])
        slots = sum(p is slot for p in pieces)
        if not images and not slots:
            return self.prepare(prompt, None, add_bos)
        self._check_images(slots, images)
        from vision import pan_and_scan, preprocess

        block = [c.boi_token_id] + [c.image_token_id] * c.vision.tokens_per_image + [c.eoi_token_id]
        full = ["\n\n", block, "\n\n"]
        expanded, pixels, it = [], [], iter(images)
        for piece in pieces:
            if piece is not slot:
                expanded.append(piece)
                continue
            image = next(it)
            crops = pan_and_scan(image)
            pixels += [preprocess(x, c.vision.image_size) for x in [image, *crops]]
            if not crops:
                expanded += full
                continue
            expanded += ["Here is the original image ", *full, " and here are some crops to help you see better "]
            for k in range(len(crops)):
                expanded += ([" "] if k else []) + full
        ids, text = [tok.bos_id] if add_bos else [], ""
        for piece in expanded + [[]]:
            if isinstance(piece, str):
                text += piece
                continue
            ids += tok.encode(text, add_bos=False) if text else []
            ids, text = ids + list(piece), ""
        return self.encode_prompt(ids), np.stack(pixels)  # (checks the ids against the vocabulary)

    def _check_images(self, markers: int, images: list) -> None:
        if self.config.vision is None:
            raise ValueError("this model has no vision tower: it cannot take images")
        if markers != len(images):
            raise ValueError(f"the prompt has {markers} <start_of_image> marker(s) but {len(images)} image(s) "
                             f"were given")

    def encode_prompt(self, prompt: str | Sequence[int], add_bos: bool = True) -> list[int]:
        """Token ids of a text prompt (with <bos>) or a list of ids, checked against the model's vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_bos=add_bos) if prompt else []
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("prompt is empty; give at least one character (or token id)")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"prompt token id {bad} is outside the model's vocabulary [0, {self.config.vocab_size})")
        return ids

    def new_cache(self, batch_size: int, max_len: int | None = None) -> Cache:
        return init_cache(self.config, batch_size, max_len or self.max_len, self.cache_dtype)

    def prefill(self, rows: Sequence[Sequence[int]], cache: Cache,
                images: np.ndarray | None = None) -> tuple[jax.Array, Cache]:
        """Appends `rows` (one id list per cache row) to the cache; returns last logits [B, V] and the cache.

        Rows are left-padded to a common bucket length and fed in chunks of
        `prefill_chunk`; every row's last token lands in the last column. With
        `images` (all images of all rows, in order) the rows go in one chunk, so
        no image block is ever split between chunks.
        """
        for logits, cache in self.prefill_chunks(rows, cache, images):
            pass
        return logits, cache

    def prefill_chunks(self, rows: Sequence[Sequence[int]], cache: Cache,
                       images: np.ndarray | None = None) -> Iterator[tuple[jax.Array, Cache]]:
        """`prefill`, one chunk at a time: yields (last logits [B, V], cache) after each chunk (the
        logits are the prompt's only after the last). Each cache yielded before the last is donated
        to the next chunk; a caller may run other work between chunks (the serving engine decodes)."""
        lengths = np.asarray([len(r) for r in rows])
        width = _bucket(int(lengths.max()), self.prefill_chunk)
        tokens = np.zeros((len(rows), width), np.int32)
        offsets = np.full((len(rows), width), -1, np.int64)
        for b, row in enumerate(rows):
            tokens[b, width - len(row):] = row
            offsets[b, width - len(row):] = np.arange(len(row))
        start = np.asarray(cache.length)[:, None]
        fresh = not start.any()  # the first chunk then attends over itself only
        positions = np.where(offsets >= 0, start + offsets, -1).astype(np.int32)
        chunk = width if images is not None else min(width, self.prefill_chunk)
        for c in range(0, width, chunk):
            sl = slice(c, c + chunk)
            logits, cache = _extend(self._model_key, self._leaves, jnp.asarray(tokens[:, sl]),
                                    jnp.asarray(positions[:, sl]), cache,
                                    None if images is None else jnp.asarray(images), c == 0 and fresh)
            yield logits, cache

    def _check_room(self, prompt_lengths: Sequence[int], max_new_tokens: int, used: int = 0) -> None:
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        need = used + max(prompt_lengths) + max_new_tokens
        if need > self.max_len:
            raise ValueError(f"prompt ({max(prompt_lengths)} tokens{f' after {used} in the cache' if used else ''}) "
                             f"+ max_new_tokens ({max_new_tokens}) = {need} exceeds max_len {self.max_len}; "
                             f"shorten the prompt or create the Sampler with a larger max_len")

    def _stop_at(self, ids: list[int], stop: Sequence[str] | None) -> tuple[list[int], str]:
        text = self.tokenizer.decode(ids)
        if not stop:
            return ids, text
        cut = first_stop(text, stop)
        if cut < 0:
            return ids, text
        text = text[:cut]
        return ids_before(self.tokenizer, ids, text), text

    # ------------------------------------------------------------------ public
    def generate(self, prompt_or_prompts: str | Sequence[str], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop: Sequence[str] | None = None, images=None,
                 pan_and_scan: bool = False) -> SamplerOutput:
        """Continues one prompt (str, a list of token ids, or a list mixing text and images) or a batch
        (list of them) of any lengths. `images`: the images of the `<start_of_image>` markers of one
        prompt, or one list per prompt of a batch. `pan_and_scan`: add Pan & Scan crops of elongated
        images (see `prepare`).

        temperature 0 is greedy. Generation of a row ends at <eos>, <end_of_turn>,
        a `stop` string (cut before it) or after `max_new_tokens`.
        """
        single = isinstance(prompt_or_prompts, str) or (len(prompt_or_prompts) > 0 and any(
            not isinstance(p, (str, list, tuple)) for p in prompt_or_prompts))
        prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
        if not prompts:
            raise ValueError("no prompts given")
        params = SamplingParams(temperature, top_k, top_p)
        per_prompt = [images] if single else (list(images) if images is not None else [None] * len(prompts))
        if len(per_prompt) != len(prompts):
            raise ValueError(f"images must hold one list per prompt ({len(prompts)}), got {len(per_prompt)}")
        prepared = [self.prepare(p, im, pan_and_scan=pan_and_scan) for p, im in zip(prompts, per_prompt)]
        rows = [ids for ids, _ in prepared]
        pixels = [px for _, px in prepared if px is not None]
        pixels = np.concatenate(pixels) if pixels else None
        self._check_room([len(r) for r in rows], max_new_tokens)
        steps = _bucket(max_new_tokens, 1 << 30)
        cache_len = min(self.max_len, _bucket(max(map(len, rows)), self.prefill_chunk) + steps)
        cache = self.new_cache(len(rows), cache_len)
        logits, cache = self.prefill(rows, cache, pixels)
        out, _ = _decode_loop(self._model_key, self._leaves, cache, logits, jax.random.key(seed),
                              jnp.asarray(self.stop_ids, jnp.int32), params, steps, jnp.int32(max_new_tokens),
                              jnp.zeros((len(rows),), bool))
        results = []
        for row in np.asarray(out):
            ids = row.tolist()
            ids = ids[:ids.index(-1)] if -1 in ids else ids
            results.append(self._stop_at(ids, stop))
        if single:
            return SamplerOutput(results[0][1], results[0][0])
        return SamplerOutput([t for _, t in results], [i for i, _ in results])

    def generate_speculative(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                             stop: Sequence[str] | None = None,
                             draft_len: int | Sequence[int] | None = None, draft: str = "lookup") -> SamplerOutput:
        """`generate` for one text prompt with speculative decoding (gemma/speculative.py): greedy ids are
        generate's, sampled ids distributed as generate's. `draft`: "lookup" (n-grams copied from the context,
        checked in one pass), "vocab" (the model's own body with a sub-vocabulary head drafts, the full head
        checks) or "hybrid" (vocab, but a lookup pass after a recurring 3-gram). `draft_len`: tokens drafted a
        pass (None: the method's default)."""
        from gemma import speculative

        ids, _ = speculative.generate(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, draft_len,
                                      draft=draft)
        ids, text = self._stop_at(ids, stop)
        return SamplerOutput(text, ids)

    def stream(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, stop: Sequence[str] | None = None,
               images=None, pan_and_scan: bool = False) -> Iterator[str]:
        """Yields the continuation of `prompt` piece by piece (whole UTF-8 characters only)."""
        params = SamplingParams(temperature, top_k, top_p)
        row, pixels = self.prepare(prompt, images, pan_and_scan=pan_and_scan)
        self._check_room([len(row)], max_new_tokens)
        steps = _bucket(max_new_tokens, 1 << 30)  # bucketed like the prompt: fewer cache shapes to compile
        cache = self.new_cache(1, min(self.max_len, _bucket(len(row), self.prefill_chunk) + steps))
        logits, cache = self.prefill([row], cache, pixels)
        yield from self.stream_from(logits, cache, max_new_tokens, params, seed, stop)

    def stream_from(self, logits: jax.Array, cache: Cache, max_new_tokens: int, params: SamplingParams,
                    seed: int, stop: Sequence[str] | None, on_done=None) -> Iterator[str]:
        """Decodes one row token by token from prefilled `logits` / `cache`.

        The first piece needs only the prefill (in a fresh process the decode
        program takes ~1 s to trace and load). Each later id is fed, and the next
        sampled, by one program dispatched before the id is read, so the host's
        reading and showing overlap the device's step. Every generated id except a
        stop id is fed, also the one whose piece was last yielded when the caller
        closes the stream there; `on_done(fed_ids, cache)` receives them at the
        end, however the stream ends (exhausted, closed, or an exception such as
        KeyboardInterrupt: after one inside a decode step `cache` may be the
        donated, deleted one). A stop string may cut the text before the last fed id.
        """
        key, sub = jax.random.split(jax.random.key(seed))
        token = _sample(logits, sub, params)  # [1] on the device
        stop_ids = jnp.asarray(self.stop_ids, jnp.int32)
        text = IncrementalText(self.tokenizer, stop)
        fed: list[int] = []

        def step():  # feeds `token` (unless a stop id) and samples the next: (next token, cache, key)
            return _feed_and_sample(self._model_key, self._leaves, cache, token, key, stop_ids, params)

        try:
            for i in range(max_new_tokens):
                if i:  # dispatched before this token is read and shown
                    following, cache, key = step()
                t = int(token[0])
                if t in self.stop_ids:
                    break
                piece, closed = text.push(t), False
                if piece:
                    try:
                        yield piece
                    except GeneratorExit:  # the caller stopped: this token is fed, then the stream ends
                        closed = True
                if not i:  # the first piece waits for no decode program
                    following, cache, key = step()
                fed.append(t)
                token = following
                if closed:
                    return
                if text.stopped:
                    break
            piece = text.flush()
            if piece:
                yield piece
        finally:
            if on_done is not None:
                on_done(fed, cache)


class IncrementalText:
    """Turns ids into text pieces as they come: only whole UTF-8 characters, cut at a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] | None = None):
        self.tokenizer, self.stop = tokenizer, list(stop or [])
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = first_stop(text, self.stop)
        if cut >= 0:
            self.stopped, text = True, text[:cut]
        elif text.endswith("\ufffd"):  # a partial UTF-8 character (byte-fallback pieces): wait
            return ""
        return self._advance(text)

    def flush(self) -> str:
        return "" if self.stopped else self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return piece


_sample = jax.jit(sample_logits, static_argnums=(2,))
