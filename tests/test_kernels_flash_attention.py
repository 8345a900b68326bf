"""The Pallas flash-attention kernel: values and gradients against the float32 reference in
interpret mode, rows without visible keys, poisoned outputs, block skipping, model and
training integration, sharded meshes, and the GPU (Triton) and TPU (Mosaic) lowerings."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fake_devices_env

from jaxlm.kernels import flash_kernels
from jaxlm.kernels.flash_attention import BlockSizes, flash_attention, reference_attention
from jaxlm.models.attention import attend

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


@dataclasses.dataclass(frozen=True)
class Shape:
    b: int
    s: int
    h: int
    kh: int
    e: int
    t: int | None = None  # keys (default: s)
    causal: bool = True
    segmented: bool = False
    dtype: str = "float32"
    q_offset: int = 0
    blocks: BlockSizes | None = None


def _blocks(q: int, k: int, q_bwd: int, k_bwd: int) -> BlockSizes:
    return BlockSizes(q, k, q_bwd, k_bwd)


CASES = {
    "f32-causal-segments-gqa2-ragged-e24": Shape(
        2, 40, 4, 2, 24, segmented=True, blocks=_blocks(16, 16, 16, 8)
    ),
    "f32-full-gqa1-e64": Shape(1, 64, 2, 2, 64, causal=False, blocks=_blocks(32, 32, 32, 32)),
    "f32-causal-gqa4-ragged": Shape(1, 50, 4, 1, 32, blocks=_blocks(16, 32, 32, 16)),
    "f32-cross-lengths-q-offset": Shape(
        1, 24, 2, 1, 16, t=56, q_offset=32, blocks=_blocks(8, 16, 8, 16)
    ),
    "bf16-causal-segments-gqa2": Shape(
        2, 64, 4, 2, 64, segmented=True, dtype="bfloat16", blocks=_blocks(32, 16, 16, 32)
    ),
    "bf16-full-segments-gqa4-ragged-e128": Shape(
        1,
        33,
        4,
        1,
        128,
        causal=False,
        segmented=True,
        dtype="bfloat16",
        blocks=_blocks(16, 16, 16, 16),
    ),
    "bf16-causal-default-blocks": Shape(1, 128, 2, 1, 64, dtype="bfloat16"),
}


def packed_segments(rng: np.random.Generator, b: int, s: int) -> np.ndarray:
    """Rows of three documents (ids 1, 2, 3) followed by padding (id 0), as jaxlm packs."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, s), size=3, replace=False))
        row = np.searchsorted(cuts, np.arange(s), side="right") + 1
        rows.append(np.where(row == 4, 0, row).astype(np.int32))
    return np.stack(rows)


def make_inputs(shape: Shape, seed: int = 0):
    """Fresh random q, k, v, output cotangent and segment ids for a shape."""
    t = shape.t or shape.s
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(shape.dtype)
    q = jnp.asarray(rng.standard_normal((shape.b, shape.s, shape.h, shape.e)), dt)
    k = jnp.asarray(rng.standard_normal((shape.b, t, shape.kh, shape.e)), dt)
    v = jnp.asarray(rng.standard_normal((shape.b, t, shape.kh, shape.e)), dt)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = None
    if shape.segmented:
        seg = jnp.asarray(packed_segments(rng, shape.b, shape.s))
    return q, k, v, d_out, seg


def value_and_grads(fn, q, k, v, d_out):
    """(out, dq, dk, dv) of fn for the cotangent d_out, compiled once."""

    def run(q, k, v, d_out):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(d_out.astype(out.dtype)))

    return jax.jit(run)(q, k, v, d_out)


def rel_err(got: jax.Array, want: jax.Array) -> float:
    """Largest error relative to the largest reference magnitude."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


def check_case(shape: Shape, seed: int = 0) -> None:
    """Kernel forward and all three gradients match the float32 reference on the same inputs."""
    q, k, v, d_out, seg = make_inputs(shape, seed)
    kw = dict(causal=shape.causal, q_offset=shape.q_offset)
    kw.update(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg)
    kernel = lambda q, k, v: flash_attention(q, k, v, block_sizes=shape.blocks, **kw)  # noqa: E731
    truth = lambda q, k, v: reference_attention(q, k, v, **kw)  # noqa: E731
    got = value_and_grads(kernel, q, k, v, d_out)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = value_and_grads(truth, *f32, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == q.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert float(jnp.abs(w).max()) > 1e-3, f"{name}: a vanishing reference proves nothing"
        assert rel_err(g, w) < TOL[shape.dtype], (name, rel_err(g, w))


@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_reference(name):
    check_case(CASES[name])


SWEEP = [
    Shape(2, s, 4, kh, e, causal=c, segmented=seg, dtype=dt, blocks=_blocks(16, 32, 32, 16))
    for c, seg, kh, dt, (s, e) in itertools.product(
        (True, False), (True, False), (4, 2, 1), ("float32", "bfloat16"), ((64, 64), (45, 40))
    )
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", SWEEP, ids=lambda s: f"{s.dtype}-c{s.causal:d}-seg{s.segmented:d}-k{s.kh}-s{s.s}"
)
def test_sweep_matches_reference(shape):
    check_case(shape, seed=shape.s + shape.kh)


def test_queries_without_visible_keys_get_zeros_not_nan():
    shape = Shape(1, 32, 2, 1, 16, segmented=True, blocks=_blocks(8, 8, 8, 8))
    q, k, v, d_out, _ = make_inputs(shape)
    q_seg = jnp.asarray([[1] * 12 + [7] * 12 + [2] * 8])  # segment 7 has no keys
    kv_seg = jnp.asarray([[1] * 16 + [2] * 16])
    kw = dict(q_segment_ids_BxS=q_seg, kv_segment_ids_BxT=kv_seg)
    kernel = lambda q, k, v: flash_attention(q, k, v, block_sizes=shape.blocks, **kw)  # noqa: E731
    out, dq, dk, dv = value_and_grads(kernel, q, k, v, d_out)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x)))
    empty = slice(12, 24)
    assert np.all(np.asarray(out[:, empty]) == 0.0)
    assert np.all(np.asarray(dq[:, empty]) == 0.0)
    # The rows that do see keys still match the reference.
    truth = reference_attention(q, k, v, **kw)
    np.testing.assert_allclose(out[:, :12], truth[:, :12], atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(out[:, 24:]).max()) > 1e-3


def test_every_output_element_is_written():
    """The interpreter poisons output buffers with NaN; the kernels must overwrite them all,
    padding rows included."""
    from jax._src.pallas.primitives import uninitialized_value

    assert np.isnan(np.asarray(uninitialized_value((1,), jnp.float32))).all()
    plan = flash_kernels.Plan(
        scale=0.25, causal=True, q_offset=0, q_len=20, kv_len=20, groups=2,
        block_q=8, block_k=8, block_q_bwd=8, block_k_bwd=8, segmented=True, backend="cpu",
    )  # fmt: skip
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 4, 24, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 24, 16)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4])
    out, lse = flash_kernels.forward(q, k, v, seg, seg, plan)
    grads = flash_kernels.backward(q, k, v, out, lse, jnp.ones_like(out), seg, seg, plan)
    for x in (out, lse, *grads):
        assert np.all(np.isfinite(np.asarray(x))), x.shape


def test_causal_block_ranges_skip_hidden_and_unmask_visible_blocks():
    plan = flash_kernels.Plan(
        scale=1.0, causal=True, q_offset=0, q_len=64, kv_len=64, groups=1,
        block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, segmented=False, backend="cpu",
    )  # fmt: skip
    for i in range(4):  # query block i sees key blocks 0..i; only the diagonal needs a mask
        n_full, hi = flash_kernels._kv_blocks(jnp.int32(i), 16, 16, plan)
        assert (int(n_full), int(hi)) == (i, i + 1)
        lo, lo_full = flash_kernels._q_blocks(jnp.int32(i), 16, 16, plan)
        assert (int(lo), int(lo_full)) == (i, i + 1)
    ragged = dataclasses.replace(plan, causal=False, kv_len=60)
    assert flash_kernels._kv_blocks(jnp.int32(0), 16, 16, ragged) == (3, 4)
    assert [int(x) for x in flash_kernels._q_blocks(jnp.int32(3), 16, 16, ragged)] == [0, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_sizes=BlockSizes(block_q=24)), "power of two"),
        (dict(q_offset=-1), "q_offset"),
        (dict(q_segment_ids_BxS=jnp.ones((1, 8), jnp.int32)), "both"),
    ],
)
def test_bad_arguments_are_refused_in_one_sentence(kwargs, match):
    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=match):
        flash_attention(x, x, x, **kwargs)
    with pytest.raises(ValueError, match="dtypes differ"):
        flash_attention(x, x.astype(jnp.bfloat16), x)


# --- integration ------------------------------------------------------------------------------


def test_attend_pallas_equals_model_reference_with_padding_segments():
    """jaxlm's convention: padding (segment 0) queries attend to padding keys."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 12, 2, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3]])
    kw = dict(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg)
    for causal in (True, False):
        ref = attend(q, k, v, impl="reference", causal=causal, **kw)
        np.testing.assert_allclose(
            attend(q, k, v, impl="pallas", causal=causal, **kw), ref, atol=1e-5, rtol=1e-5
        )


def test_training_with_pallas_matches_reference_losses():
    import flax.linen as nn
    import optax

    from jaxlm.config import ModelConfig, RunConfig, resolve
    from jaxlm.models import build_model
    from jaxlm.train.state import TrainState
    from jaxlm.train.step import make_train_step

    s, vocab = 32, 64
    cfg = ModelConfig(
        family="llama", vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
        max_seq_len=s, init_std=0.1,
    )  # fmt: skip
    cfg = resolve(RunConfig(model=cfg)).model
    rng = np.random.default_rng(0)
    seg = np.stack([np.r_[np.ones(20), np.full(12, 2)], np.r_[np.ones(25), np.zeros(7)]])
    pos = np.stack([np.r_[np.arange(20), np.arange(12)], np.arange(s)])
    batch = {
        "inputs": rng.integers(0, vocab, (2, s)).astype(np.int32),
        "targets": rng.integers(0, vocab, (2, s)).astype(np.int32),
        "segment_ids": seg.astype(np.int32),
        "positions": pos.astype(np.int32),
        "weights": (seg > 0).astype(np.float32),
    }
    params = build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, s), jnp.int32))
    params = nn.unbox(params["params"])
    tx = optax.adamw(1e-2)
    losses = {}
    for impl in ("reference", "pallas"):
        step = jax.jit(make_train_step(build_model(dataclasses.replace(cfg, attention=impl)), tx))
        state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            rng=jax.random.PRNGKey(1),
        )  # fmt: skip
        losses[impl] = []
        for _ in range(3):
            state, metrics = step(state, batch)
            losses[impl].append(float(metrics["loss"]))
    assert losses["reference"][-1] < losses["reference"][0] - 0.5  # it learns
    np.testing.assert_allclose(losses["pallas"], losses["reference"], rtol=1e-5, atol=0)


SHARDED_WORKER = r"""
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxlm.config import MeshConfig
from jaxlm.parallel.sharding import make_mesh, mesh_context
import jaxlm.models.attention as attention
import jaxlm.models.attention_kernels as kernels

local_shapes = []
real_flash = kernels.long_flash_attention
def spy(q, *a, **kw):
    local_shapes.append(q.shape)
    return real_flash(q, *a, **kw)
kernels.long_flash_attention = spy

mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, sequence=1))
rng = np.random.default_rng(0)
q = rng.standard_normal((4, 16, 4, 8)).astype(np.float32)
k, v = (rng.standard_normal((4, 16, 2, 8)).astype(np.float32) for _ in range(2))
seg = np.repeat([[1] * 10 + [2] * 6], 4, 0).astype(np.int32)
heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
rows = NamedSharding(mesh, P(("data", "fsdp"), None))
args = [jax.device_put(x, heads) for x in (q, k, v)] + [jax.device_put(seg, rows)]

def loss(impl):
    def f(q, k, v, seg):
        with mesh_context(mesh):
            o = attention.attend(q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, impl=impl)
        return jnp.sum(o * o)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

ref, pal = loss("reference")(*args), loss("pallas")(*args)
err = max(
    float(jnp.abs(a - b).max() / jnp.abs(a).max())
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(pal))
)
print(json.dumps({"err": err, "local_shapes": local_shapes, "loss": float(ref[0])}))
"""


def test_sharded_mesh_runs_the_kernel_per_shard():
    env = fake_devices_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_WORKER], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loss"] > 1.0
    assert result["err"] < 1e-5  # relative to the largest reference value
    # batch 4 over data*fsdp = 4 and heads 4 over tensor = 2: each shard sees 1 row, 2 heads
    assert result["local_shapes"] and all(s == [1, 16, 2, 8] for s in result["local_shapes"])


# --- lowering for accelerators this machine does not have ------------------------------------


def _kernel_loss(backend: str, dtype=jnp.bfloat16, s: int = 256, b: int = 2):
    """A fwd+bwd of the kernel (GQA, causal, segments) and abstract args for it."""

    def loss(q, k, v, seg):
        out = flash_attention(
            q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, backend=backend
        )
        return jnp.sum(out.astype(jnp.float32))

    args = (
        jax.ShapeDtypeStruct((b, s, 4, 128), dtype),
        jax.ShapeDtypeStruct((b, s, 2, 128), dtype),
        jax.ShapeDtypeStruct((b, s, 2, 128), dtype),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
    )
    return jax.value_and_grad(loss, argnums=(0, 1, 2)), args


@pytest.mark.parametrize(
    "platform, backend, target",
    [("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_kernels_lower_for_gpu_triton_and_tpu_mosaic(platform, backend, target):
    """Pallas -> Triton IR / Mosaic MLIR runs without the device; the final compile needs it."""
    fn, args = _kernel_loss(backend)
    skip = jax.export.DisabledSafetyCheck.custom_call(target)
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=[skip])(*args)
    text = exported.mlir_module()
    assert text.count(target) == 3  # forward, dq, dk/dv


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu is not installed (pip install "jax[tpu]" adds it; CI does)',
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_compile_ahead_of_time_for_a_tpu_topology(dtype):
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    topo = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    )  # fmt: skip
    mesh = Mesh(np.asarray(topo.devices), ("data",))
    fn, args = _kernel_loss("tpu", dtype, s=512, b=2 * mesh.size)
    per_chip = jax.shard_map(
        fn, mesh=mesh, in_specs=P("data"), out_specs=(P(), P("data")), check_vma=False
    )
    rows = NamedSharding(mesh, P("data"))
    sharded = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows) for a in args]
    compiled = jax.jit(per_chip).lower(*sharded).compile()
    assert compiled.memory_analysis() is not None
    assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize(
    "name", ["f32-causal-segments-gqa2-ragged-e24", "bf16-causal-segments-gqa2"]
)
def test_gpu_kernel_matches_reference(name):
    check_case(dataclasses.replace(CASES[name], blocks=None))
