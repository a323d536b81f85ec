"""Multi-turn chat with the Gemma 3 template; the KV cache is kept between turns.

Template (no system role: a system prompt opens the first user turn, then a blank line):

    <bos><start_of_turn>user\\n{system}\\n\\n{message}<end_of_turn>\\n<start_of_turn>model\\n
    {reply}<end_of_turn>\\n<start_of_turn>user\\n{message}<end_of_turn>\\n<start_of_turn>model\\n ...

Turn 2 prefills only its new tokens: the reply's ids are already in the cache,
except the closing <end_of_turn> (sampled, not yet fed), which opens the next turn.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from gemma.sampler import Sampler, SamplingParams
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

USER, MODEL = "user", "model"


def format_turn(message: str, *, first: bool, system: str | None = None) -> str:
    """Text of one user turn and the opening of the model's turn (without <bos>)."""
    opening = "" if first else "<end_of_turn>\n"
    if first and system:
        message = f"{system}\n\n{message}"
    return f"{opening}<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"


class ChatSampler:
    """Chat with a Gemma 3 model: `send(message)` returns the reply; the cache persists across turns.

    Args:
      model, tokenizer: as for `Sampler`.
      system: optional system prompt (Gemma 3 prepends it to the first user turn).
      max_len: tokens the whole dialog may hold (the cache is allocated once).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, system: str | None = None, *,
                 max_len: int | None = None, cache_dtype=None):
        self.sampler = Sampler(model, tokenizer, max_len=max_len, cache_dtype=cache_dtype)
        self.tokenizer = tokenizer
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forgets the dialog (history, tokens, cache)."""
        self.history: list[dict[str, str]] = []
        self.tokens: list[int] = []  # every id fed to the cache so far, in order
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
        """Like `send`, yielding the reply piece by piece."""
        parts = [message] if isinstance(message, str) else list(message)
        if not any(isinstance(p, str) and p.strip() for p in parts) and not images and all(
                isinstance(p, str) for p in parts):
            raise ValueError("message must be a non-empty string (or a list mixing text and images)")
        params = SamplingParams(temperature, top_k, top_p)
        first = self._cache is None
        opening, closing = format_turn("\0", first=first, system=self.system).split("\0")
        new, pixels = self.sampler.prepare([opening, *parts, closing] if not isinstance(message, str)
                                           else opening + message + closing, images, add_bos=first,
                                           pan_and_scan=pan_and_scan)
        self.sampler._check_room([len(new)], max_new_tokens, used=len(self.tokens))
        cache = self.sampler.new_cache(1) if first else self._cache
        self._cache = None  # donated to the prefill; restored when the reply is done
        logits, cache = self.sampler.prefill([new], cache, pixels)
        self.tokens += new
        self.history.append({"role": USER, "text": message if isinstance(message, str) else
                             "".join(p if isinstance(p, str) else "<start_of_image>" for p in parts)})
        reply: list[str] = []

        def done(ids, cache):
            self._cache = cache
            self.tokens += ids
            self.history.append({"role": MODEL, "text": "".join(reply)})

        for piece in self.sampler.stream_from(logits, cache, max_new_tokens, params, seed, stop, on_done=done):
            reply.append(piece)
            yield piece
