"""RL actors as separate processes around a central inference server (SEED RL).

    def reward(prompt, completion): return float("Paris" in completion)
    with Actors("http://127.0.0.1:8000", reward, num_actors=8, max_tokens=32, temperature=1.0) as actors:
        actors.put(prompts)                      # each gets a request id
        for rollout in actors.rollouts(len(prompts), timeout=600): learner.add(rollout)

Each actor process takes one prompt at a time from the supervisor over its own pipe, asks the server
for a completion over HTTP (token logprobs included), computes the reward, and sends the rollout
back. The supervisor (a thread of the learner's process) restarts an actor that dies and re-queues
the prompt it held; rollouts are delivered once per request id, so a prompt is never lost and never
answered twice, even when an actor dies after sending its result. A reward function that raises or
returns something other than a finite number does not stop its actor: the rollout arrives with reward
NaN and `error` saying why (the learner drops it), counted in `Actors.reward_errors`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing.connection import wait
from typing import Callable, Iterable, Iterator


@dataclasses.dataclass(frozen=True)
class Rollout:
    request_id: int
    prompt: str
    completion: str
    tokens: list[str]
    logprobs: list[float]
    reward: float
    weights_versions: tuple[int, int]  # first and last version the completion was generated under
    actor: int
    error: str | None = None  # why the reward is NaN: the reward function raised or gave no finite number


def score(reward: Callable[[str, str], float], prompt: str, completion: str) -> tuple[float, str | None]:
    """(reward(prompt, completion), None), or (NaN, why) when it raises or returns no finite number."""
    try:
        value = reward(prompt, completion)
        number = float(value)
    except Exception as e:  # noqa: BLE001 - any failure of the user's function is reported with the rollout
        return math.nan, f"the reward function raised {type(e).__name__}: {e}"
    if not math.isfinite(number):
        return math.nan, f"the reward function returned {value!r}, not a finite number"
    return number, None


def _actor_main(conn, index: int, url: str, reward: Callable[[str, str], float], request: dict,
                api_key: str | None, timeout: float) -> None:
    """One actor: (request id, prompt) in, Rollout out, until the pipe closes."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        while True:
            try:
                rid, prompt = conn.recv()
            except (EOFError, OSError):  # the supervisor closed the pipe
                return
            try:
                r = client.post("/v1/completions", json={**request, "prompt": prompt, "logprobs": 0, "n": 1})
                if r.status_code != 200:
                    raise RuntimeError(f"the server answered {r.status_code}: {r.text[:500]}")
                choice = r.json()["choices"][0]
                text = choice["text"]
                value, error = score(reward, prompt, text)
                message = ("rollout", Rollout(rid, prompt, text, choice["logprobs"]["tokens"],
                                              choice["logprobs"]["token_logprobs"], value,
                                              tuple(choice["weights_versions"]), index, error))
            except Exception as e:  # noqa: BLE001 - reported to the supervisor, which re-queues the prompt
                message = ("error", rid, f"{type(e).__name__}: {e}")
            try:
                conn.send(message)
            except OSError:  # the supervisor closed the pipe
                return


class Actors:
    """`num_actors` actor processes fed from one queue of prompts; see the module docstring.

    request: the /v1/completions fields each actor sends (max_tokens, temperature, ...).
    max_attempts: a prompt whose request fails this many times is given up (reported in `failed`).
    reward_errors: rollouts delivered with a NaN reward (the reward function raised or gave no finite number).
    """

    def __init__(self, url: str, reward: Callable[[str, str], float], num_actors: int = 8, *,
                 api_key: str | None = None, timeout: float = 300.0, max_attempts: int = 3, **request):
        if num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        self.url, self.reward, self.request = url, reward, request
        self.api_key, self.timeout, self.max_attempts = api_key, timeout, max_attempts
        # never fork a process that runs jax threads: actors fork from a server process that imported this
        # module and the reward's (once) instead of each spawn importing jax again
        self._ctx = mp.get_context("forkserver")
        module = getattr(reward, "__module__", None)
        self._ctx.set_forkserver_preload([__name__] + ([module] if module and module != "__main__" else []))
        self._todo: collections.deque[tuple[int, str]] = collections.deque()
        self._prompts: dict[int, str] = {}
        self._attempts: collections.Counter = collections.Counter()
        self._delivered: set[int] = set()
        self._out: queue.Queue[Rollout] = queue.Queue()
        self.failed: dict[int, str] = {}
        self.restarts = 0
        self.reward_errors = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._procs: list = [None] * num_actors
        self._conns: list = [None] * num_actors
        self.inflight: dict[int, int | None] = {i: None for i in range(num_actors)}  # actor -> request id
        for i in range(num_actors):
            self._start(i)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="gemma-actors", daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def put(self, prompts: Iterable[str]) -> list[int]:
        """Queues prompts; returns their request ids."""
        ids = []
        with self._lock:
            for prompt in prompts:
                rid = next(self._ids)
                self._prompts[rid] = prompt
                self._todo.append((rid, prompt))
                ids.append(rid)
        return ids

    def rollouts(self, count: int, timeout: float | None = None) -> Iterator[Rollout]:
        """The next `count` rollouts as they arrive (TimeoutError past `timeout` seconds in all)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for _ in range(count):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                yield self._out.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"no rollout within {timeout} s") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self._conns:
            conn.close()
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ supervisor
    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_actor_main, args=(child, i, self.url, self.reward, self.request, self.api_key,
                                                        self.timeout), daemon=True, name=f"gemma-actor-{i}")
        p.start()
        child.close()
        self._procs[i], self._conns[i] = p, parent

    def _requeue(self, i: int, why: str) -> None:
        rid = self.inflight[i]
        self.inflight[i] = None
        if rid is None or rid in self._delivered:
            return
        self._attempts[rid] += 1
        if self._attempts[rid] >= self.max_attempts:
            self.failed[rid] = why
        else:
            with self._lock:
                self._todo.appendleft((rid, self._prompts[rid]))

    def _supervise(self) -> None:
        while not self._stop.is_set():
            for i, p in enumerate(self._procs):  # restart the dead, re-queueing what they held
                if not p.is_alive():
                    self._drain(i)
                    self._requeue(i, f"actor {i} died (exit code {p.exitcode})")
                    self._conns[i].close()
                    self.restarts += 1
                    self._start(i)
            for i in range(len(self._procs)):  # hand out work
                if self.inflight[i] is None:
                    with self._lock:
                        task = self._todo.popleft() if self._todo else None
                    if task is not None:
                        try:
                            self._conns[i].send(task)
                            self.inflight[i] = task[0]
                        except (OSError, BrokenPipeError):
                            with self._lock:
                                self._todo.appendleft(task)
            for conn in wait(self._conns, timeout=0.05):
                self._receive(self._conns.index(conn))

    def _drain(self, i: int) -> None:
        """Takes whatever a dead actor sent before it died (a dead peer's pipe polls readable: stop at EOF)."""
        try:
            while self._conns[i].poll() and self._receive(i):
                pass
        except (EOFError, OSError):
            pass

    def _receive(self, i: int) -> bool:
        """Handles one message from actor i; False when its pipe is at EOF (it died)."""
        try:
            message = self._conns[i].recv()
        except (EOFError, OSError):
            return False  # the actor died; the next pass restarts it
        if message[0] == "rollout":
            rollout = message[1]
            self.inflight[i] = None
            if rollout.request_id not in self._delivered:
                self._delivered.add(rollout.request_id)
                self.reward_errors += rollout.error is not None
                self._out.put(rollout)
        else:
            self._requeue(i, message[2])
        return True
