"""RL rollouts through one central server (SEED RL) vs per-actor inference, real Gemma 3 270M by default.

    python benchmarks/rl_rollouts.py --actors 16 --per-actor 1,2,4 --prompts 64 --max-tokens 32

central: one `python -m gemma serve` process (continuous batching, --max-batch = --actors) and --actors actor
processes (gemma.serve.actors.Actors): each takes a prompt, asks the server for a sampled completion with its
token logprobs, computes a reward and sends the rollout back.
per-actor: P processes, each loading the model itself and generating its prompts one at a time with
Sampler.generate (batch 1, the jitted decode loop: this project's fastest single-prompt path; it returns no
logprobs, so the baseline does less work than the server), computing the same reward.
Both: the same prompts, temperature 1, max_tokens each, timed from the moment every process is loaded and warmed
(load and compile are not counted for either) to the last rollout; rollouts/s and completion tokens/s. Each
process's peak RSS (VmHWM) is reported: P processes hold P copies of the weights, so P is bounded by memory
(--per-actor levels whose estimated memory exceeds what is available are skipped, and said so).
`--model tiny`: a tiny random model with the real tokenizer (for a 16-process per-actor run that fits anywhere).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("river mountain lantern harbor winter orchard castle engine garden letter market violin forest "
         "bridge island candle meadow tower station library").split()


def prompts(count: int, offset: int = 0) -> list[str]:
    rng = np.random.default_rng(offset)
    return [f"Story {offset + i}: Once upon a time, near the {' and the '.join(rng.choice(WORDS, 3))}, there lived"
            for i in range(count)]


def reward(prompt: str, completion: str) -> float:
    """A cheap verifier-style reward: the share of distinct words in the completion."""
    words = completion.split()
    return len(set(words)) / max(1, len(words))


def peak_rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- central: one server, actor processes


def central(source: str, dtype: str, actors: int, texts: list[str], max_tokens: int, max_len: int,
            threads: int) -> dict:
    from gemma.serve.actors import Actors
    from gemma.serve.metrics import parse

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "gemma", "serve", "--model", source, "--port", str(port), "--max-batch",
           str(actors), "--max-len", str(max_len), "--dtype", dtype]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 1200
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not come up")
            time.sleep(0.5)
        up = time.perf_counter() - t
        with Actors(url, reward, num_actors=actors, timeout=600, max_tokens=max_tokens, temperature=1.0) as pool:
            warm = prompts(actors, offset=10_000)  # the actors' first requests (connections, imports)
            pool.put(warm)
            list(pool.rollouts(len(warm), timeout=1200))
            before = parse(httpx.get(url + "/metrics", timeout=10).text)
            start = time.perf_counter()
            pool.put(texts)
            got = list(pool.rollouts(len(texts), timeout=3600))
            wall = time.perf_counter() - start
            after = parse(httpx.get(url + "/metrics", timeout=10).text)
            actor_rss = [peak_rss_mib(pid) for pid in pool.pids()]
            failed, restarts = len(pool.failed), pool.restarts
        server_rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    tokens = sum(len(r.tokens) for r in got)
    batch = ((after["gemma_running_batch_size_sum"] - before["gemma_running_batch_size_sum"])
             / max(1, after["gemma_running_batch_size_count"] - before["gemma_running_batch_size_count"]))
    return {"mode": "central", "processes": actors, "rollouts": len(got), "tokens": tokens, "wall_s": round(wall, 2),
            "rollouts_per_s": round(len(got) / wall, 3), "tok_s": round(tokens / wall, 1),
            "mean_batch": round(batch, 2), "failed": failed, "restarts": restarts, "server_up_s": round(up, 1),
            "server_peak_rss_mib": round(server_rss), "actor_peak_rss_mib": round(max(actor_rss)),
            "mean_reward": round(float(np.mean([r.reward for r in got])), 4), "loadavg_1m": os.getloadavg()[0]}


# ---------------------------------------------------------------- per-actor: each process its own model


def _per_actor_main(index: int, source: str, dtype: str, max_tokens: int, max_len: int, tasks, results, go) -> None:
    import jax.numpy as jnp

    import checkpoints
    from gemma.sampler import Sampler

    tokenizer = checkpoints.load_tokenizer(source)
    sampler = Sampler(checkpoints.load(source, dtype=jnp.dtype(dtype)), tokenizer, max_len=max_len)
    sampler.generate(prompts(1, offset=20_000 + index)[0], max_new_tokens=max_tokens, temperature=1.0, seed=0)
    results.put(("ready", index, peak_rss_mib()))
    go.wait()
    while True:
        task = tasks.get()
        if task is None:
            break
        rid, prompt = task
        out = sampler.generate(prompt, max_new_tokens=max_tokens, temperature=1.0, seed=rid)
        results.put(("rollout", rid, len(out.tokens), reward(prompt, out.text)))
    results.put(("done", index, peak_rss_mib()))


def per_actor(source: str, dtype: str, processes: int, texts: list[str], max_tokens: int, max_len: int,
              threads: int) -> dict:
    ctx = mp.get_context("spawn")
    tasks, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned processes
    procs = [ctx.Process(target=_per_actor_main, args=(i, source, dtype, max_tokens, max_len, tasks, results, go),
                         daemon=True) for i in range(processes)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    try:
        ready = [results.get(timeout=1800) for _ in procs]
        up = time.perf_counter() - t
        for rid, text in enumerate(texts):
            tasks.put((rid, text))
        for _ in procs:
            tasks.put(None)
        time.sleep(1.0)  # the queue's feeder thread has the tasks in the pipe before the clock starts
        start = time.perf_counter()
        go.set()
        got, done, wall = [], [], None
        while len(done) < processes:
            message = results.get(timeout=3600)
            (got if message[0] == "rollout" else done).append(message)
            if len(got) == len(texts) and wall is None:  # the last rollout (the "done" messages follow)
                wall = time.perf_counter() - start
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    tokens = sum(m[2] for m in got)
    return {"mode": "per-actor", "processes": processes, "rollouts": len(got), "tokens": tokens,
            "wall_s": round(wall, 2), "rollouts_per_s": round(len(got) / wall, 3), "tok_s": round(tokens / wall, 1),
            "processes_up_s": round(up, 1), "peak_rss_mib_each": round(max(m[2] for m in done)),
            "peak_rss_mib_total": round(sum(m[2] for m in done)),
            "mean_reward": round(float(np.mean([m[3] for m in got])), 4), "loadavg_1m": os.getloadavg()[0]}


def tiny_model(directory: str) -> str:
    """A tiny random model with the real tokenizer, saved (orbax) under `directory`."""
    from flax import nnx

    import checkpoints
    from gemma import config
    from gemma.transformer import Transformer

    model = Transformer(config.tiny(vocab_size=262_144, d_model=64, hidden_dim=128, head_dim=16, num_layers=2,
                                    layer_types=("local", "global")), rngs=nnx.Rngs(0))
    return checkpoints.save(model, os.path.join(directory, "tiny"), tokenizer=checkpoints.load_tokenizer("gemma3-270m"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m", help="'gemma3-270m', 'tiny', or any checkpoint source")
    ap.add_argument("--actors", type=int, default=16, help="actor processes around the central server")
    ap.add_argument("--per-actor", default="1,2,4", help="per-actor process counts, comma-separated")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="cores in all (each mode's processes share them)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--order", default="central,per-actor", help="which mode first (the other follows)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()

    import checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        source = tiny_model(tmp) if args.model == "tiny" else (
            checkpoints._bundled_270m() if args.model == "gemma3-270m" else args.model)
        texts = prompts(args.prompts)
        results = {"model": args.model, "source": source, "cores": os.cpu_count(), "dtype": args.dtype,
                   "max_tokens": args.max_tokens, "prompts": args.prompts, "loadavg_before": os.getloadavg(),
                   "machine": platform.machine(), "runs": []}
        for mode in args.order.split(","):
            if mode == "central":
                row = central(source, args.dtype, args.actors, texts, args.max_tokens, args.max_len, args.threads)
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
                continue
            each = None
            for p in [int(x) for x in args.per_actor.split(",")]:
                if each is not None and p * each > available_mib() - 2048:
                    row = {"mode": "per-actor", "processes": p, "skipped": f"needs ~{p * each:.0f} MiB at "
                           f"{each:.0f} MiB a process; {available_mib():.0f} MiB available"}
                else:
                    row = per_actor(source, args.dtype, p, texts, args.max_tokens, args.max_len,
                                    max(1, args.threads // p))
                    each = row["peak_rss_mib_each"]
                results["runs"].append(row)
                print(json.dumps(row), flush=True)
        results["loadavg_after"] = os.getloadavg()
        best = max((r for r in results["runs"] if r["mode"] == "per-actor" and "tok_s" in r),
                   key=lambda r: r["tok_s"], default=None)
        ours = next((r for r in results["runs"] if r["mode"] == "central"), None)
        if best and ours:
            results["central_over_best_per_actor"] = {"tok_s": round(ours["tok_s"] / best["tok_s"], 2),
                                                      "rollouts_per_s": round(ours["rollouts_per_s"] /
                                                                              best["rollouts_per_s"], 2),
                                                      "best_per_actor_processes": best["processes"]}
        print(json.dumps(results, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
