"""Multi-turn chat with the Gemma 3 template; the KV cache is kept between turns.

Template (no system role: a system prompt opens the first user turn, then a blank line):

    <bos><start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n
    {reply}<end_of_turn>\\n<start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n ...

Turn 2 prefills only its new tokens: the reply's ids are already in the cache,
except the closing <end_of_turn> (sampled, not yet fed), which opens the next turn.

The cache grows with the dialog (powers of two from 1024 slots, up to max_len):
decoding over a cache of the 270M's full 32768 slots runs at a third of the
speed of a 1024-slot one on CPU. A reply stopped early (the stream closed, or
an exception such as KeyboardInterrupt) keeps what was said; if the stop left
the cache unusable, the next turn prefills the whole dialog again.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import numpy as np

from gemma.cache import Cache
from gemma.sampler import Sampler, SamplingParams
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

USER, MODEL = "user", "model"
WHEN_FULL = ("error", "drop")
_MIN_SLOTS = 1024  # the cache's first size (or max_len, if smaller)


class ContextFull(ValueError):
    """The dialog plus the next turn (and its max_new_tokens) no longer fit in max_len."""


def format_turn(message: str, *, first: bool, system: str | None = None) -> str:
    """Text of one user turn and the opening of the model's turn (without <bos>)."""
    opening = "" if first else "<end_of_turn>\n"
    if first and system:
        message = f"{system}\n\n{message}"
    return f"{opening}<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"


def format_dialog(turns: Sequence[tuple[str, str]], system: str | None = None) -> str:
    """Text (without <bos>) of a dialog of (role, text) turns, USER and MODEL alternating from a USER
    turn and ending with one, laid out as ChatSampler feeds it, ready for the model's reply."""
    if not turns or turns[-1][0] != USER:
        raise ValueError("a dialog must end with a user turn (the model replies to it)")
    text, expected = "", USER
    for i, (role, message) in enumerate(turns):
        if role != expected:
            raise ValueError(f"turn {i} is from {role!r} but {expected!r} was expected: user and model turns "
                             f"alternate, starting with the user's")
        text += format_turn(message, first=i == 0, system=system) if role == USER else message
        expected = MODEL if role == USER else USER
    return text


@dataclasses.dataclass
class _Turn:
    """One exchange as fed to the cache: the user turn's ids (and pixels) and the reply's ids."""

    message: object  # as given to send(): text, or a list mixing text and images
    images: list | None
    pan_and_scan: bool
    ids: list[int]
    pixels: np.ndarray | None
    reply: list[int] = dataclasses.field(default_factory=list)


class ChatSampler:
    """Chat with a Gemma 3 model: `send(message)` returns the reply; the cache persists across turns.

    Args:
      model, tokenizer: as for `Sampler`.
      system: optional system prompt (Gemma 3 prepends it to the first user turn).
      max_len: tokens the whole dialog may hold (default: the model's context).
      when_full: what a turn that does not fit in max_len does: "error" raises
        `ContextFull` (a ValueError; `reset()` starts over), "drop" forgets the
        oldest exchanges until it fits.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, system: str | None = None, *,
                 max_len: int | None = None, cache_dtype=None, when_full: str = "error"):
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {when_full!r}")
        self.sampler = Sampler(model, tokenizer, max_len=max_len, cache_dtype=cache_dtype)
        self.tokenizer = tokenizer
        self.system = system
        self.max_len = self.sampler.max_len
        self.when_full = when_full
        self.reset()

    def reset(self) -> None:
        """Forgets the dialog (history, tokens, cache)."""
        self.history: list[dict[str, str]] = []
        self.tokens: list[int] = []  # every id of the dialog, in order (what the cache holds)
        self.dropped = 0  # exchanges forgotten by when_full="drop"
        self._turns: list[_Turn] = []
        self._cache = None

    @property
    def cache(self):
        return self._cache

    def send(self, message, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop: Sequence[str] | None = None, images=None,
             pan_and_scan: bool = False) -> str:
        """Adds a user turn and returns the model's reply text. `message` is text (with a
        `<start_of_image>` marker per image in `images`) or a list mixing text and images.
        `pan_and_scan`: add Pan & Scan crops of elongated images (see `Sampler.prepare`)."""
        return "".join(self.stream(message, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed, stop=stop, images=images, pan_and_scan=pan_and_scan))

    def stream(self, message, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, stop: Sequence[str] | None = None,
               images=None, pan_and_scan: bool = False) -> Iterator[str]:
        """Like `send`, yielding the reply piece by piece. Closing the stream early keeps the
        partial reply in the dialog."""
        parts = [message] if isinstance(message, str) else list(message)
        if not any(isinstance(p, str) and p.strip() for p in parts) and not images and all(
                isinstance(p, str) for p in parts):
            raise ValueError("message must be a non-empty string (or a list mixing text and images)")
        params = SamplingParams(temperature, top_k, top_p)
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        turn = self._fit(_Turn(message, images, pan_and_scan, [], None), max_new_tokens)
        if self._cache is None:  # a new dialog, or the cache was lost or turns dropped: feed it all
            feed, pixels = self.tokens + turn.ids, self._all_pixels([*self._turns, turn])
            cache = self.sampler.new_cache(1, self._slots(len(feed) + max_new_tokens))
        else:
            feed, pixels = turn.ids, turn.pixels
            cache = self._grow(self._cache, len(self.tokens) + len(turn.ids) + max_new_tokens)
        self._cache = None  # donated to the prefill; restored when the reply is done
        logits, cache = self.sampler.prefill([feed], cache, pixels)
        self.tokens += turn.ids
        self._turns.append(turn)
        self.history.append({"role": USER, "text": message if isinstance(message, str) else
                             "".join(p if isinstance(p, str) else "<start_of_image>" for p in parts)})
        reply: list[str] = []

        def done(ids, cache):  # however the reply ended (see Sampler.stream_from)
            self._cache = cache if self._usable(cache, len(self.tokens) + len(ids)) else None
            self.tokens += ids
            turn.reply = list(ids)
            self.history.append({"role": MODEL, "text": "".join(reply)})

        pieces = self.sampler.stream_from(logits, cache, max_new_tokens, params, seed, stop, on_done=done)
        try:
            for piece in pieces:
                reply.append(piece)
                yield piece
        finally:
            pieces.close()  # a caller that stopped early: `done` runs now, not at garbage collection

    # ------------------------------------------------------------------ pieces
    def _prepare(self, turn: _Turn, first: bool) -> _Turn:
        """`turn` with the ids (and pixels) of its user turn, in the first turn's form or a later one's."""
        opening, closing = format_turn("\0", first=first, system=self.system).split("\0")
        prompt = (opening + turn.message + closing if isinstance(turn.message, str)
                  else [opening, *turn.message, closing])
        turn.ids, turn.pixels = self.sampler.prepare(prompt, turn.images, add_bos=first,
                                                     pan_and_scan=turn.pan_and_scan)
        return turn

    def _fit(self, turn: _Turn, max_new_tokens: int) -> _Turn:
        """Prepares `turn`; if the dialog + turn + max_new_tokens exceed max_len, drops the oldest
        exchanges (when_full="drop") or raises ContextFull."""
        while True:
            self._prepare(turn, first=not self._turns)
            need = len(self.tokens) + len(turn.ids) + max_new_tokens
            if need <= self.max_len:
                return turn
            if self.when_full != "drop" or not self._turns:
                used = f"the dialog ({len(self.tokens)} tokens) + " if self.tokens else ""
                raise ContextFull(f"{used}this turn ({len(turn.ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                                  f"= {need} exceeds max_len {self.max_len}"
                                  + ("; reset() starts over, when_full='drop' forgets the oldest turns"
                                     if self.tokens else "; shorten the message or lower max_new_tokens"))
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        """Forgets the oldest exchange; the next one becomes the first turn (<bos>, system prompt)."""
        self._turns.pop(0)
        self.history = self.history[2:]
        self.dropped += 1
        if self._turns:
            self._prepare(self._turns[0], first=True)
        self.tokens = [i for t in self._turns for i in t.ids + t.reply]
        self._cache = None  # the next turn prefills the kept dialog

    @staticmethod
    def _all_pixels(turns: list[_Turn]) -> np.ndarray | None:
        pixels = [t.pixels for t in turns if t.pixels is not None]
        return np.concatenate(pixels) if pixels else None

    def _slots(self, need: int) -> int:
        """Cache size for `need` tokens: a power of two >= _MIN_SLOTS (few sizes, few compilations), <= max_len."""
        return min(self.max_len, max(_MIN_SLOTS, 1 << (need - 1).bit_length()))

    def _grow(self, cache: Cache, need: int) -> Cache:
        """`cache`, moved into a larger one when it has fewer than `need` slots."""
        if need <= cache.max_len:
            return cache
        return _moved(cache, self.sampler.new_cache(1, self._slots(need)))

    @staticmethod
    def _usable(cache: Cache, length: int) -> bool:
        """Whether `cache` holds exactly `length` tokens and none of its buffers was donated away."""
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(cache)):
            return False
        return int(cache.length[0]) == length


@jax.jit
def _moved(cache: Cache, bigger: Cache) -> Cache:
    """`bigger` (empty, more slots) holding `cache`'s keys and values. A position p below the old size
    has the same slot in both: p in a linear layer, p mod W in a ring (a linear local layer of the
    smaller cache has at most W slots, so there p < W too)."""
    def moved(old, new):  # every array (k, v [B, S, K, H], int8 scales [B, S, K]); `ring` may differ
        arrays = [n.at[:, :o.shape[1]].set(o) for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(old))]
        return jax.tree.unflatten(jax.tree.structure(new), arrays)

    return Cache(tuple(moved(old, new) for old, new in zip(cache.layers, bigger.layers)), cache.length)
