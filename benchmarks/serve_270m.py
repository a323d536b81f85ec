"""Serving throughput and latency, real Gemma 3 270M: `python -m gemma serve` vs llama-cpp-python's
OpenAI-compatible server (`python -m llama_cpp.server`) on the same GGUF file, same threads.

    python benchmarks/serve_270m.py --reference-python /work/venvref/bin/python
    python benchmarks/serve_270m.py --compare /tmp/before . --levels 16 --repeats 3   # ours A/B, interleaved

Each server runs as its own process on 127.0.0.1. At each concurrency c, c client threads take requests
from one list (max(c, 2) requests, distinct prompts, greedy, max_tokens each) and post them as plain
(non-streamed) completions; tokens/s = completion tokens (from usage) / wall time of the level; latency =
each request's post to answer. --warmup requests per server first, each max_tokens long (llama.cpp's
first few requests after start run several times slower than the rest; our warm-up also compiles).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("river mountain lantern harbor winter orchard castle engine garden letter market violin forest "
         "bridge island candle meadow tower station library").split()


def prompts(count: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"Story {i}: Once upon a time, near the {' and the '.join(rng.choice(WORDS, 3))}, there lived"
            for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up within {timeout} s")


def run_level(url: str, model: str, texts: list[str], clients: int, max_tokens: int) -> dict:
    def one(text):
        t = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": text, "max_tokens": max_tokens,
                                                      "temperature": 0}, timeout=1200)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    def batch_stats():  # ours only: the running batch histogram's sum and count from /metrics
        r = httpx.get(url + "/metrics", timeout=10)
        if r.status_code != 200 or "gemma_running_batch_size_sum" not in r.text:
            return None
        from gemma.serve.metrics import parse
        m = parse(r.text)
        return m["gemma_running_batch_size_sum"], m["gemma_running_batch_size_count"]

    before = batch_stats()
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, texts))
    wall = time.perf_counter() - start
    after = batch_stats()
    latency = np.asarray([r[0] for r in results])
    tokens = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(texts), "tokens": tokens, "wall_s": round(wall, 2),
            "tok_s": round(tokens / wall, 1), "p50_s": round(float(np.percentile(latency, 50)), 2),
            "p95_s": round(float(np.percentile(latency, 95)), 2),
            "mean_batch": None if before is None else round((after[0] - before[0]) / max(1, after[1] - before[1]), 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def start(name: str, cmd: list[str], env: dict, startup: float, warmup: int, max_tokens: int,
          cwd: str = ROOT) -> tuple[subprocess.Popen, str, str]:
    """A server process, up and warmed: (process, url, model id)."""
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    url = f"http://127.0.0.1:{port}"
    print(f"[{name}] {' '.join(cmd)} (in {cwd})", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_up(url, proc, startup)
        print(f"[{name}] up in {time.perf_counter() - t:.1f} s", flush=True)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for _ in range(warmup):  # full-length requests: llama.cpp's first few run several times slower
            run_level(url, model, ["Warm up: hello"], 1, max_tokens)
    except BaseException:
        stop(proc)
        raise
    return proc, url, model


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if proc.returncode not in (0, -15, None):
        print(proc.stderr.read()[-3000:], file=sys.stderr)


def bench(name: str, cmd: list[str], env: dict, levels: list[int], max_tokens: int, startup: float,
          warmup: int) -> list[dict]:
    proc, url, model = start(name, cmd, env, startup, warmup, max_tokens)
    try:
        rows, offset = [], 0
        for c in levels:
            count = max(c, 2)
            row = run_level(url, model, prompts(offset + count)[offset:], c, max_tokens)
            offset += count
            rows.append(row)
            print(f"[{name}] {row}", flush=True)
        return rows
    finally:
        stop(proc)


def compare(cmd: list[str], env: dict, roots: list[str], levels: list[int], max_tokens: int, warmup: int,
            repeats: int) -> dict:
    """Our server from each checkout in `roots` (PYTHONPATH = that root), all up at once; each level runs on
    each server in turn, `repeats` times (A B A B ...: the load of the machine falls on both alike)."""
    servers = {}
    try:
        for root in roots:
            servers[root] = start(root, cmd, {**env, "PYTHONPATH": root}, 1200, warmup, max_tokens, cwd=root)
        out = {root: [] for root in roots}
        offset = 0
        for r in range(repeats):
            for c in levels:
                count = max(c, 2)
                for root, (_, url, model) in servers.items():
                    row = {**run_level(url, model, prompts(offset + count)[offset:], c, max_tokens), "repeat": r}
                    out[root].append(row)
                    print(f"[{root}] {row}", flush=True)
                offset += count
        return out
    finally:
        for proc, _, _ in servers.values():
            stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-python", default="/work/venvref/bin/python",
                    help="a Python with llama-cpp-python[server]")
    ap.add_argument("--levels", default="1,4,16,32", help="concurrent clients, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up requests (max-tokens long) per server")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="our parameter dtype")
    ap.add_argument("--only", choices=["ours", "llama"], default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--compare", nargs="+", default=None, metavar="ROOT",
                    help="instead: our server from each of these checkouts (e.g. a git worktree of an older commit "
                         "and this one), levels interleaved across them; no llama.cpp")
    ap.add_argument("--repeats", type=int, default=2, help="with --compare: rounds of the levels")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import checkpoints

    gguf = checkpoints._bundled_270m()  # the GGUF file both servers load
    max_len = 512
    env = dict(os.environ)
    results = {"machine": platform.processor() or platform.machine(), "gguf": gguf, "threads": args.threads,
               "max_tokens": args.max_tokens, "dtype": args.dtype}
    try:
        results["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                              if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results["cores"] = os.cpu_count()
    results["loadavg_before"] = os.getloadavg()
    ours_env = {**env, "OMP_NUM_THREADS": str(args.threads)}  # XLA's pool: one thread per core
    ours_cmd = [sys.executable, "-m", "gemma", "serve", "--model", gguf, "--port", "{port}",
                "--max-batch", str(max(levels)), "--max-len", str(max_len), "--dtype", args.dtype]
    if args.compare:
        results["compare"] = compare(ours_cmd, ours_env, [os.path.abspath(r) for r in args.compare], levels,
                                     args.max_tokens, args.warmup, args.repeats)
    elif args.only in (None, "ours"):
        results["ours"] = bench("ours", ours_cmd, ours_env, levels, args.max_tokens, 1200, args.warmup)
    if args.only in (None, "llama") and not args.compare:
        cmd = [args.reference_python, "-m", "llama_cpp.server", "--model", gguf, "--port", "{port}",
               "--host", "127.0.0.1", "--n_ctx", str(max_len), "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads), "--interrupt_requests", "False", "--model_alias",
               "gemma3-270m", "--verbose", "False"]
        results["llama_cpp_server"] = bench("llama.cpp", cmd, env, levels, args.max_tokens, 300, args.warmup)
    results["loadavg_after"] = os.getloadavg()
    if "ours" in results and "llama_cpp_server" in results:
        results["ratio_tok_s"] = {r["clients"]: round(r["tok_s"] / q["tok_s"], 2)
                                  for r, q in zip(results["ours"], results["llama_cpp_server"])}
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
