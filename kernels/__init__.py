"""Attention kernels. One entry point, `attention`, over per-query key intervals.

`kernels` knows nothing of models: it takes q, k, v and the interval of keys
each query may see. Implementations:

  xla         the reference (kernels.reference); with a `window` hint on a long
              self-attention it runs banded (kernels.banded), O(T * W); with a `lookahead` hint on a
              shorter one, in query chunks over the keys each can reach (banded.blocked: ~T^2 / 2
              causal pairs scored, not T^2)
  pallas_tpu  flash attention in Pallas/Mosaic for TPU, forward and backward
  pallas_gpu  flash attention in Pallas/Triton for GPU, forward and backward; on a Hopper GPU
              bf16/f16 self-attention runs in Pallas Mosaic GPU instead (kernels.flash_hopper and
              flash_hopper_bwd: wgmma + TMA); decode steps (T == 1) go to the split-K decode
              kernel (kernels.decode; head_dim a power of two >= 16)
  splash      jax's TPU splash attention on band masks; everything else (caches, lookahead,
              intervals found not to be the band at run time) takes pallas_tpu
  cudnn       jax.nn.dot_product_attention through cuDNN on band masks without padding; everything
              else (caches, lookahead, decode steps, soft-cap, operands cuDNN refuses: f32, mixed
              dtypes, head_dims it lacks; other intervals at run time) takes pallas_gpu
  auto        pallas_tpu on TPU, pallas_gpu on GPU, xla on CPU; on a Hopper GPU causal layers go
              to cudnn, where it was timed faster (`hopper_route`)

On a CPU backend the Pallas implementations run in interpret mode.
"""

from __future__ import annotations

import importlib

# Importing kernels imports no jax (gemma.config reads IMPLS): jax and the implementations load on first use.
IMPLS = ("xla", "pallas_tpu", "pallas_gpu", "splash", "cudnn")
BAND_ONLY = {"splash": "pallas_tpu", "cudnn": "pallas_gpu"}  # serve the plain causal/window mask; the
# flash kernel each one hands the rest to
BANDED_MIN_LEN = 4  # the banded XLA path pays off once T spans this many windows
# shorter promised bands (lookahead given): query chunks over the key prefix each can reach, at most
# BLOCKED_MAX_CHUNKS of them (each its own static shapes), no shorter than BLOCKED_MIN_CHUNK
BLOCKED_MIN_CHUNK, BLOCKED_MAX_CHUNKS = 64, 8


def resolve(impl: str, platform: str | None = None) -> str:
    """The concrete implementation "auto" stands for on `platform` (default: the default backend)."""
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS + ('auto',)}")
        return impl
    if not platform:
        import jax

        platform = jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform, "xla")


def hopper_route(q: jax.Array, band: bool, softcap: float | None, window: int | None,
                 lookahead: int | None) -> str:
    """Where "auto" sends a call on a Hopper GPU, "cudnn" or "pallas_gpu", by what an H200 measured
    (benchmarks/RESULTS.md, run G; bf16):

      "cudnn"       causal self-attention (hinted lookahead 0, no window): cuDNN forward and backward.
                    T = 32K, head_dim 256: forward 6.8 ms to ours 7.6, forward + backward 36.1 to 37.9;
                    head_dim 128 (27B's), T = 16K: forward + backward 15.0 to 22.1.
      "pallas_gpu"  everything else: ours. Windowed layers: our forward ties cuDNN's (1.01x at T = 32K,
                    W = 1024) and forward + backward beats it at head_dim 256, 3.0 ms to 3.5 (0.64 to
                    0.96 at T = 2K, W = 512), and is within timing noise of it at 128 (1.06 to 1.02).

    The cuDNN route also needs operands cuDNN takes (`jax_ops.cudnn_serves`; T > 1); intervals
    that are not the causal band at run time (padding, packed segments) still take our kernel
    (`jax_ops.cudnn`'s run-time check)."""
    from kernels import flash_hopper, jax_ops

    causal = band and window is None and lookahead == 0
    # q stands for k and v here: `attention` checks their dtypes against cudnn_serves again
    if causal and jax_ops.cudnn_serves(q, q, q, softcap, interpret=False) and flash_hopper.on_hopper():
        return "cudnn"
    return "pallas_gpu"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_start: jax.Array,
    k_end: jax.Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    k_pos: jax.Array | None = None,
    impl: str = "auto",
    window: int | None = None,
    lookahead: int | None = None,
) -> jax.Array:
    """Attention of q [B, T, N, H] over k, v [B, S, K, H]; query (b, t) sees keys s with
    k_start[b, t] <= k_pos[b, s] <= k_end[b, t] (k_pos defaults to s). `scale` defaults to H ** -0.5.

    `window` and `lookahead` are optional static promises about self-attention
    (S == T, no k_pos): every query t only sees keys in [t - window + 1, t + lookahead]
    (lookahead 0: causal). They let the band paths run: the banded XLA
    fallback, and splash / cudnn, which serve only the plain causal/window mask
    (lookahead 0 or None; padding rows are those with an empty interval). Calls splash / cudnn cannot
    serve (a cache, lookahead, operands cuDNN refuses) run on the flash kernel for the same platform
    (pallas_tpu / pallas_gpu), as do intervals that turn out at run time not to be the band (packed
    segments, another window): the result is always the intervals' attention.
    """
    import jax

    from kernels import blocks, reference

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects q [B,T,N,H] and k, v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if k_start.shape != q.shape[:2] or k_end.shape != q.shape[:2]:
        raise ValueError(f"k_start/k_end must be [B, T] = {q.shape[:2]}; got {k_start.shape}, {k_end.shape}")
    if k_pos is not None and k_pos.shape != k.shape[:2]:
        raise ValueError(f"k_pos must be [B, S] = {k.shape[:2]}; got {k_pos.shape}")
    band = k_pos is None and q.shape[1] == k.shape[1]
    if (window is not None or lookahead is not None) and not band:
        raise ValueError("window/lookahead hints apply to self-attention only (S == T, no k_pos)")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    requested, impl = impl, resolve(impl)
    interpret = jax.default_backend() == "cpu"
    args = (q, k, v, k_start, k_end)
    if requested == "auto" and impl == "pallas_gpu":
        impl = hopper_route(q, band, softcap, window, lookahead)
    if impl in BAND_ONLY:
        from kernels import jax_ops
        if not band or lookahead or (impl == "cudnn" and not jax_ops.cudnn_serves(q, k, v, softcap, interpret)):
            impl = BAND_ONLY[impl]
        elif impl == "splash":
            return jax_ops.splash(*args, scale=scale, softcap=softcap, window=window, interpret=interpret)
        else:
            return jax_ops.cudnn(*args, scale=scale, window=window, interpret=interpret)
    if impl == "pallas_tpu":
        from kernels import flash_tpu
        return flash_tpu.attention(*args, scale=scale, softcap=softcap, k_pos=k_pos, interpret=interpret)
    if impl == "pallas_gpu":
        from kernels import decode
        if q.shape[1] == 1 and decode.serves(q.shape[-1]):
            return decode.attention(*args, scale=scale, softcap=softcap, k_pos=k_pos, interpret=interpret)
        from kernels import flash_gpu
        return flash_gpu.attention(*args, scale=scale, softcap=softcap, k_pos=k_pos, interpret=interpret)
    if window is not None and q.shape[1] >= BANDED_MIN_LEN * window:
        from kernels import banded
        return banded.attention(*args, scale=scale, softcap=softcap, window=window, lookahead=lookahead or 0)
    if band and lookahead is not None and q.shape[1] >= 2 * BLOCKED_MIN_CHUNK:
        from kernels import banded
        chunk = max(BLOCKED_MIN_CHUNK, blocks.round_up(-(-q.shape[1] // BLOCKED_MAX_CHUNKS), BLOCKED_MIN_CHUNK))
        return banded.blocked(*args, scale=scale, softcap=softcap, window=window, lookahead=lookahead, chunk=chunk)
    return reference.attention(*args, scale=scale, softcap=softcap, k_pos=k_pos)


def __getattr__(name: str):
    """Submodules on first access (`kernels.reference` after `import kernels`), as an eager import gave."""
    try:
        return importlib.import_module(f"kernels.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"kernels.{name}":
            raise
        raise AttributeError(f"module 'kernels' has no attribute {name!r}") from None
