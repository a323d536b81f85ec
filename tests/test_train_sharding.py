"""Sharding of fine-tuning: the same losses on 1 device, on 8 simulated devices (fsdp=8 and
data=2,fsdp=2,tensor=2) and on 2 processes x 4 devices; parameters really split; the rule table on the
real presets' shapes; a 4B LoRA step lowered for a 256-chip TPU mesh on this CPU; mesh errors.

The device count of a jax process is fixed when jax starts, so every multi-device run is a subprocess
(tests/train_sharding_worker.py) with XLA_FLAGS=--xla_force_host_platform_device_count=N; each prints its
per-step losses. benchmarks/lower_train_step.py lowers all of 4B / 12B / 27B, full and LoRA.
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gemma import config
from gemma.attention import Attention
from gemma.layers import Embedder, GeGLU, RMSNorm
from gemma.train import lora, sharding, trainer

WORKER = pathlib.Path(__file__).parent / "train_sharding_worker.py"
ROOT = WORKER.parent.parent
TIMEOUT = 420  # s for one worker process (about 40 s each on a quiet 2-core CPU)
RTOL = 1e-5
KV2 = [{"lora": False, "kv_heads": 2}, {"lora": True, "kv_heads": 2}]
KV1 = [{"lora": False, "kv_heads": 1}, {"lora": True, "kv_heads": 1}]
TENSOR_MESH = "data=2,fsdp=2,tensor=2"


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_BIND_ADDRESS", "JAX_LOCAL_DEVICE_IDS"):
        env.pop(name, None)
    return env


def _start(spec: dict, devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[dict]:
    """Waits for the workers (all killed once TIMEOUT has passed or one fails); their RESULT objects."""
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT)
            outputs.append(out)
            if proc.returncode != 0:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{out[-4000:]}")
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a worker ran over {TIMEOUT} s and was killed") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, f"no RESULT line from the worker:\n{out[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _assert_close(losses, reference, what) -> float:
    """Asserts each step's loss within RTOL of the one-device run's; returns the largest relative gap."""
    assert len(losses) == len(reference) == 3, what
    for step, (a, b) in enumerate(zip(losses, reference)):
        assert abs(a - b) <= RTOL * abs(b), f"{what}: step {step} loss {a!r} vs {b!r} on one device " \
                                            f"({abs(a - b) / abs(b):.2e} relative)"
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"{what}: losses {[round(x, 6) for x in losses]}, at most {gap:.1e} from one device")
    return gap


@pytest.fixture(scope="module")
def eight_devices():
    """One process with 8 CPU devices: the one-device reference (a mesh of device 0 alone), fsdp=8 and
    data=2,fsdp=2,tensor=2, each on full fine-tuning and LoRA of the tiny model with 2 and 1 KV heads
    (fsdp=8 on 2 KV heads only: one KV head matters under tensor)."""
    spec = {"runs": [{"mesh": None, "cases": KV2 + KV1}, {"mesh": "fsdp=8", "cases": KV2},
                     {"mesh": TENSOR_MESH, "cases": KV2 + KV1}]}
    (out,) = _finish([_start(spec, 8)])
    assert out["devices"] == 8 and out["process_count"] == 1
    one, fsdp, mixed = out["results"]
    return {"one": one, "fsdp=8": fsdp, TENSOR_MESH: mixed}


def _reference(runs, case):
    return runs["one"][(KV2 + KV1).index(case)]


def test_losses_agree_on_one_device_fsdp8_and_data_fsdp_tensor(eight_devices):
    one = eight_devices["one"]
    for i, case in enumerate(KV2 + KV1):
        losses = one[i]["losses"]
        assert all(math.isfinite(x) and 5 < x < 8 for x in losses), (case, losses)  # ~ln 512 = 6.24 at init
    # the steps trained something: full and LoRA (b = 0 at start) share step 0 and part after it
    assert one[0]["losses"][0] == one[1]["losses"][0] and one[0]["losses"][1] != one[1]["losses"][1]
    for mesh, cases in (("fsdp=8", KV2), (TENSOR_MESH, KV2 + KV1)):
        for case, result in zip(cases, eight_devices[mesh]):
            _assert_close(result["losses"], _reference(eight_devices, case)["losses"], f"{mesh} {case}")


def test_parameters_are_split_over_the_mesh(eight_devices):
    one, fsdp, mixed = eight_devices["one"], eight_devices["fsdp=8"], eight_devices[TENSOR_MESH]
    assert one[0]["specs"]["embedding"] == [None, None]
    # fsdp=8: the [512, 64] table is split on its width, each device holds 512 x 8
    for result in fsdp:
        assert result["specs"]["embedding"] == [None, "fsdp"] and result["shard_shapes"]["embedding"] == [512, 8]
        assert result["specs"]["q_proj.w"] == ["fsdp", None, None]
    assert fsdp[1]["specs"]["k_proj.a"] == ["fsdp", None]  # LoRA a [64, 4]: the model width
    assert fsdp[1]["specs"]["k_proj.b"] == [None, None, "fsdp"]  # b [4, 2, 16]: head_dim, as fsdp has no rule
    # data=2,fsdp=2,tensor=2: vocabulary over tensor, width over fsdp; q heads over tensor
    kv2_full, kv2_lora, kv1_full, kv1_lora = mixed
    for result in mixed:
        assert result["specs"]["embedding"] == ["tensor", "fsdp"] and result["shard_shapes"]["embedding"] == [256, 32]
        assert result["specs"]["q_proj.w"] == ["fsdp", "tensor", None]
    assert kv2_full["specs"]["k_proj.w"] == ["fsdp", "tensor", None]
    assert kv2_full["shard_shapes"]["k_proj.w"] == [32, 1, 16]
    # one KV head cannot be split over tensor: left whole, the projection split over fsdp only
    for result in (kv1_full, kv1_lora):
        assert result["specs"]["k_proj.w"] == ["fsdp", None, None] and result["shard_shapes"]["k_proj.w"] == [32, 1, 16]
    assert kv1_lora["specs"]["k_proj.b"] == [None, None, "fsdp"]
    assert kv2_lora["specs"]["k_proj.b"] == [None, "tensor", "fsdp"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_device(eight_devices):
    """jax.distributed over 127.0.0.1 (gloo collectives), a mesh over the 8 devices of both processes, each
    process feeding its own half of every global batch."""
    port = _free_port()
    procs = [_start({"runs": [{"mesh": TENSOR_MESH, "cases": KV2}],
                     "distributed": {"port": port, "process_id": i, "num_processes": 2}}, 4) for i in range(2)]
    outs = _finish(procs)
    assert sorted(o["process_index"] for o in outs) == [0, 1]
    for out in outs:
        assert out["process_count"] == 2 and out["devices"] == 8 and out["local_devices"] == 4
        for case, result in zip(KV2, out["results"][0]):
            _assert_close(result["losses"], _reference(eight_devices, case)["losses"],
                          f"process {out['process_index']} of 2, {TENSOR_MESH} {case}")
            assert result["specs"]["embedding"] == ["tensor", "fsdp"]


# ------------------------------------------------------------------------ the rule table on real shapes


def _abstract(make):
    """{path: (logical axes, shape)} of the Params of the module make() builds, nothing allocated."""
    module = nnx.eval_shape(make)
    out = {}
    for path, v in nnx.iter_graph(module):
        if isinstance(v, nnx.Variable):
            out[".".join(map(str, path))] = (v.get_metadata()["logical_axes"], v.get_value().shape)
    return out


def _specs(params, mesh_shape):
    return {name: sharding.partition_spec(axes, shape, mesh_shape) for name, (axes, shape) in params.items()}


def _layer_params(cfg, rank=8):
    """A decoder layer's projections, the embedder, a norm and LoRA (rank 8) on q, k, o, gate: {path: ...}."""
    def build():
        rngs = nnx.Rngs(0)
        attn, mlp = Attention(cfg, "global", rngs=rngs), GeGLU(cfg.d_model, cfg.hidden_dim, rngs=rngs)
        adapted = Attention(cfg, "global", rngs=rngs), GeGLU(cfg.d_model, cfg.hidden_dim, rngs=rngs)
        return nnx.Dict(attn=attn, mlp=mlp, embedder=Embedder(cfg.vocab_size, cfg.d_model, rngs=rngs),
                        norm=RMSNorm(cfg.d_model),
                        lora_q=lora.LoRAEinsum(adapted[0].q_proj, rank, rank, rngs=rngs),
                        lora_k=lora.LoRAEinsum(adapted[0].k_proj, rank, rank, rngs=rngs),
                        lora_o=lora.LoRAEinsum(adapted[0].o_proj, rank, rank, rngs=rngs),
                        lora_gate=lora.LoRAEinsum(adapted[1].gate_proj, rank, rank, rngs=rngs))
    return _abstract(build)


POD = {"fsdp": 64, "tensor": 4}


@pytest.mark.parametrize("preset", [config.gemma3_270m, config.gemma3_1b])
def test_rules_leave_a_single_kv_head_whole(preset):
    cfg = preset()
    specs = _specs(_layer_params(cfg), POD)
    assert specs["attn.k_proj.w"] == specs["attn.v_proj.w"] == P("fsdp", None, None)  # [D, 1, 256]
    assert specs["attn.q_proj.w"] == P("fsdp", "tensor", None)  # 4 query heads over tensor=4
    assert specs["lora_k.b"] == P(None, None, "fsdp")  # [8, 1, 256]
    assert specs["embedder.embedding"] == P("tensor", "fsdp")
    # fsdp=256 does not divide d_model 640: every matrix still splits over fsdp, on another dimension
    if cfg.d_model == 640:
        wide = _specs(_layer_params(cfg), {"fsdp": 256})
        assert wide["embedder.embedding"] == P("fsdp", None)  # the vocabulary
        assert wide["attn.k_proj.w"] == P(None, None, "fsdp")  # head_dim 256
        assert wide["mlp.gate_proj.w"] == P(None, "fsdp")
        assert wide["norm.scale"] == P(None)


def test_rules_split_every_matrix_of_27b_over_the_whole_pod():
    cfg = config.gemma3_27b().text_only()
    params = _layer_params(cfg)
    specs = _specs(params, POD)
    assert specs["attn.q_proj.w"] == P("fsdp", "tensor", None)  # [5376, 32, 128]
    assert specs["attn.k_proj.w"] == specs["attn.v_proj.w"] == P("fsdp", "tensor", None)  # [5376, 16, 128]
    assert specs["attn.o_proj.w"] == P("tensor", None, "fsdp")
    assert specs["mlp.gate_proj.w"] == specs["mlp.up_proj.w"] == P("fsdp", "tensor")  # [5376, 21504]
    assert specs["mlp.down_proj.w"] == P("tensor", "fsdp")
    assert specs["embedder.embedding"] == P("tensor", "fsdp")  # [262208, 5376]
    assert specs["attn.q_norm.scale"] == specs["norm.scale"] == P(None)  # vectors stay whole
    assert specs["lora_q.a"] == P("fsdp", None) and specs["lora_q.b"] == P(None, "tensor", "fsdp")
    assert specs["lora_o.a"] == P("tensor", "fsdp", None)  # [32, 128, 8]: heads, then head_dim for fsdp
    assert specs["lora_gate.b"] == P(None, ("tensor", "fsdp"))  # [8, 21504]
    for name, (axes, shape) in params.items():  # each matrix: 1/256 of it on a device, but for LoRA's
        # [5376, 8] and [8, 5376] factors, which have no dimension for tensor (172 KB each): 1/64
        if len(shape) >= 2:
            split = math.prod(POD[a] for s in specs[name] if s for a in ((s,) if isinstance(s, str) else s))
            assert split == (64 if sorted(shape) == [8, 5376] else 256), (name, shape, specs[name])


def test_mesh_errors_name_the_counts():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"needs {2 * n + 2} devices but there are {n}\b"):
        sharding.make_mesh(f"fsdp={2 * n + 2}")
    with pytest.raises(ValueError, match=r"needs 8 devices but there are 1\b"):
        sharding.make_mesh("data=2,fsdp=2,tensor=2", jax.devices()[:1])
    with pytest.raises(ValueError, match="unknown axis 'model'.*data, fsdp, tensor"):
        sharding.parse_mesh("model=2")
    with pytest.raises(ValueError, match="expected name=size pairs"):
        sharding.parse_mesh("fsdp:2")
    with pytest.raises(ValueError, match="size >= 1, got 0"):
        sharding.parse_mesh("tensor=0")
    assert sharding.parse_mesh("data=2, tensor=4") == {"data": 2, "tensor": 4}
    assert sharding.make_mesh().shape == {"data": 1, "fsdp": n, "tensor": 1}


# ------------------------------------------------------------------------ lowering for a TPU pod


def test_4b_lora_step_lowers_for_a_256_chip_tpu_mesh():
    """The Trainer's step (abstract_step: same function, shardings, donation) for the 4B, LoRA rank 8,
    lowered for TPU over an abstract fsdp=64 x tensor=4 mesh; one device holds ~1/256 of the parameters
    and optimizer state (only the norm scales whole, and LoRA's a [D, 8] split 64 ways)."""
    mesh = jax.sharding.AbstractMesh((1, 64, 4), sharding.MESH_AXES)
    tc = trainer.TrainConfig(steps=10, batch_size=64, seq_len=512, lora_rank=8, compute_dtype="bfloat16",
                             remat="full")
    step, args = trainer.abstract_step(config.gemma3_4b().text_only(), tc, mesh)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args))
    with jax.sharding.use_abstract_mesh(mesh):
        text = step.trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "mhlo.num_partitions = 256" in text
    assert 'tensor<262208x2560xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"tensor"}, {"fsdp"}]>' in text
    state = args[:3]
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    per_device = sharding.bytes_per_device(state)
    assert 14 * 2**30 < total < 15 * 2**30  # 3.88e9 f32 frozen weights + rank-8 adapters and their moments
    assert per_device <= 1.05 * total / 256, (per_device, total / 256)
    trainable, frozen, opt_state, batches = args
    assert len(jax.tree.leaves(trainable)) == 2 * 7 * 34  # only the adapters are trained
    assert batches.inputs.shape == (1, 64, 512) and batches.inputs.sharding.spec == P(None, ("data", "fsdp"))
