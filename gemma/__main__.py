"""Command line: `python -m gemma generate PROMPT` and `python -m gemma chat`.

The default model, gemma3-270m, is the real *pretrained* Gemma 3 270M (not
instruction-tuned): it continues text well and chats poorly.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    from kernels import IMPLS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="gemma3-270m",
                        help="'gemma3-270m' (bundled), a .gguf file, an HF safetensors dir or an orbax dir")
    common.add_argument("--max-new-tokens", type=int, default=64)
    common.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    common.add_argument("--top-k", type=int, default=None)
    common.add_argument("--top-p", type=float, default=None)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    common.add_argument("--attention-impl", default="auto",
                        choices=("auto",) + IMPLS,
                        help="kernels.attention implementation (auto: Pallas on TPU/GPU, XLA on CPU)")
    p = argparse.ArgumentParser(prog="python -m gemma", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], help="continue a prompt, streaming the text")
    gen.add_argument("prompt")
    chat = sub.add_parser("chat", parents=[common], help="interactive multi-turn chat (Gemma chat template)")
    chat.add_argument("--system", default=None, help="system prompt, prepended to the first user turn")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import jax.numpy as jnp

    import checkpoints
    from gemma.sampler import SamplingParams

    try:  # check the flags before the (slow) load
        SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model = checkpoints.load(args.model, dtype=jnp.dtype(args.dtype)).with_attention_impl(args.attention_impl)
        tokenizer = checkpoints.load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.command == "generate":
        from gemma.sampler import Sampler

        print(args.prompt, end="", flush=True)
        for piece in Sampler(model, tokenizer).stream(args.prompt, **sampling):
            print(piece, end="", flush=True)
        print()
        return 0

    from gemma.chat import ChatSampler

    chat = ChatSampler(model, tokenizer, system=args.system)
    print("Chat with Gemma 3 (empty line or Ctrl-D to quit, /reset to start over).", file=sys.stderr)
    while True:
        try:
            message = input("> ")
        except EOFError:
            break
        if not message.strip():
            break
        if message.strip() == "/reset":
            chat.reset()
            continue
        for piece in chat.stream(message, **sampling):
            print(piece, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
