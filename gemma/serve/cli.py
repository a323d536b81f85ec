"""`python -m gemma serve`: the OpenAI-compatible server over a continuous-batching engine.

Flags are checked before the weights load; a bad one exits with status 2 and one line.
FastAPI and uvicorn (the `serve` extra) are imported only here, when the command runs.
"""

from __future__ import annotations

import argparse
import sys

HELP = "serve the OpenAI-compatible HTTP API (completions, chat, streaming) with continuous batching"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help=HELP, description=HELP + ". Endpoints: POST /v1/completions, "
                       "/v1/chat/completions, /v1/weights (local callers); GET /v1/models, /health, /metrics.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="gemma3-270m", help="'gemma3-270m', a .gguf file, an HF dir or an orbax dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one, printed)")
    p.add_argument("--max-batch", type=int, default=16, help="slots: requests decoded together")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="an idle server waits this long for more requests before starting a partial batch")
    p.add_argument("--max-len", type=int, default=None,
                   help="prompt + max_tokens per request (default: 4096, or the model's context if smaller)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    p.add_argument("--max-staleness", type=int, default=None,
                   help="refuse requests whose weights_version is more than this many versions old")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled between decode steps")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every program before serving")
    return p


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def check(args) -> str | None:
    """What is wrong with the flags alone, or None."""
    if not 0 <= args.port <= 65535:
        return f"--port must be in [0, 65535], got {args.port}"
    if args.max_batch < 1:
        return f"--max-batch must be >= 1, got {args.max_batch}"
    if args.max_wait_ms < 0:
        return f"--max-wait-ms must be >= 0, got {args.max_wait_ms}"
    if args.max_len is not None and args.max_len < 2:
        return f"--max-len must be >= 2 (a prompt token and a generated one), got {args.max_len}"
    if args.max_staleness is not None and args.max_staleness < 0:
        return f"--max-staleness must be >= 0, got {args.max_staleness}"
    if args.prefill_chunk < 1:
        return f"--prefill-chunk must be >= 1, got {args.prefill_chunk}"
    if args.api_key is not None and not args.api_key:
        return "--api-key needs a non-empty key"
    return None


def main(args) -> int:
    problem = check(args)
    if problem:
        return _error(problem)
    try:
        from gemma.serve import server
    except ImportError as e:
        return _error(f"{e}; the server needs FastAPI and uvicorn: pip install 'gemma3-jax[serve]'", 1)
    import socket

    import jax.numpy as jnp

    import checkpoints
    from gemma.serve.engine import Engine

    port = args.port
    if port == 0:  # pick a free port now, so it can be printed before uvicorn binds it
        with socket.socket() as s:
            s.bind((args.host, 0))
            port = s.getsockname()[1]
    dtype = jnp.dtype(args.dtype)
    try:
        tokenizer = checkpoints.load_tokenizer(args.model)
        model = checkpoints.load(args.model, dtype=dtype)
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_len=args.max_len,
                        prefill_chunk=args.prefill_chunk, max_wait_ms=args.max_wait_ms,
                        max_staleness=args.max_staleness)
    except (OSError, ValueError, ImportError) as e:
        return _error(str(e), 1)
    if not args.no_warmup:
        print("[compiling the engine's programs]", file=sys.stderr, flush=True)
        engine.warmup()
    load = lambda path: checkpoints.load(path, dtype=dtype)
    app = server.create_app(engine, args.model, api_key=args.api_key, load_weights=load)
    print(f"[serving {args.model} on http://{args.host}:{port}/v1 (max batch {engine.max_batch}, max len "
          f"{engine.max_len})]", file=sys.stderr, flush=True)
    try:
        server.serve(app, args.host, port)
    finally:
        engine.close()
    return 0
