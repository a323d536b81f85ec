"""Serving counters and the Prometheus text exposition format (no client library needed)."""

from __future__ import annotations

import collections
import threading
import time

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this trailing window


class Metrics:
    """Thread-safe counters of one engine: queued / running requests, tokens, a histogram of the
    running batch size (observed once per decode step)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.queued = 0
        self.running = 0
        self.requests = collections.Counter()  # by finish reason
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.batch_sum = 0
        self.batch_buckets = [0] * len(BATCH_BUCKETS)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def step(self, batch: int, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.steps += 1
            self.batch_sum += batch
            for i, edge in enumerate(BATCH_BUCKETS):
                if batch <= edge:
                    self.batch_buckets[i] += 1
            self.generated_tokens += tokens
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    @property
    def mean_batch(self) -> float:
        return self.batch_sum / self.steps if self.steps else 0.0

    def render(self, weights_version: int) -> str:
        """The Prometheus text format (version 0.0.4)."""
        with self._lock:
            lines = [
                "# HELP gemma_requests_queued Requests waiting for a slot.", "# TYPE gemma_requests_queued gauge",
                f"gemma_requests_queued {self.queued}",
                "# HELP gemma_requests_running Requests holding slots (prefilling or decoding).",
                "# TYPE gemma_requests_running gauge", f"gemma_requests_running {self.running}",
                "# HELP gemma_requests_total Requests ended, by finish reason.", "# TYPE gemma_requests_total counter",
            ]
            lines += [f'gemma_requests_total{{reason="{r}"}} {n}' for r, n in sorted(self.requests.items())]
            lines += [
                "# HELP gemma_prompt_tokens_total Prompt tokens prefilled.", "# TYPE gemma_prompt_tokens_total counter",
                f"gemma_prompt_tokens_total {self.prompt_tokens}",
                "# HELP gemma_generation_tokens_total Tokens generated.",
                "# TYPE gemma_generation_tokens_total counter", f"gemma_generation_tokens_total {self.generated_tokens}",
                f"# HELP gemma_generation_tokens_per_second Tokens generated per second over the last "
                f"{RATE_WINDOW_S:g} s.", "# TYPE gemma_generation_tokens_per_second gauge",
            ]
        lines.append(f"gemma_generation_tokens_per_second {self.tokens_per_second():.3f}")
        with self._lock:
            lines += ["# HELP gemma_running_batch_size Rows decoding in each decode step.",
                      "# TYPE gemma_running_batch_size histogram"]
            lines += [f'gemma_running_batch_size_bucket{{le="{e}"}} {n}' for e, n in zip(BATCH_BUCKETS,
                                                                                        self.batch_buckets)]
            lines += [f'gemma_running_batch_size_bucket{{le="+Inf"}} {self.steps}',
                      f"gemma_running_batch_size_sum {self.batch_sum}", f"gemma_running_batch_size_count {self.steps}",
                      "# HELP gemma_weights_version Version of the weights now served.",
                      "# TYPE gemma_weights_version gauge", f"gemma_weights_version {weights_version}"]
        return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value of a Prometheus text exposition (for tests and benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
