"""TPU semantics on CPU: our Mosaic flash kernel and JAX's splash kernel run in Pallas's TPU
interpreter (`pltpu.InterpretParams`: TPU memory spaces and DMAs simulated, uninitialised
memory poisoned with NaN), values and gradients against the float32 reference; and both
compiled ahead of time for a TPU chip by `jaxlm bench attention --tpu-topology`."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_kernels_flash_attention import packed_segments, rel_err, value_and_grads

from jaxlm.bench import attention as bench
from jaxlm.kernels.flash_attention import flash_attention, reference_attention
from jaxlm.kernels.splash import splash_attention
from jaxlm.kernels.tiled_attention import long_flash_attention

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def _inputs(b, s, t, h, kh, e, dtype, segmented, seed=0):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((b, s, h, e)), dt)
    k = jnp.asarray(rng.standard_normal((b, t, kh, e)), dt)
    v = jnp.asarray(rng.standard_normal((b, t, kh, e)), dt)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray(packed_segments(rng, b, s)) if segmented else None
    return q, k, v, d_out, seg


def _check(kernel, shape: tuple, dtype: str, segmented: bool, q_offset=0, **options) -> None:
    """kernel(q, k, v, ..., **options) and its gradients match the float32 reference."""
    q, k, v, d_out, seg = _inputs(*shape, dtype, segmented)
    kw = dict(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, q_offset=q_offset)
    got = value_and_grads(lambda q, k, v: kernel(q, k, v, **kw, **options), q, k, v, d_out)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = value_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), *f32, d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert g.dtype == q.dtype, name
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name  # no poisoned reads
        assert rel_err(g, w) < TOL[dtype], (name, rel_err(g, w))


# (b, s, t, h, kh, e): ragged lengths and a head dim that pads to 64 exercise the padding;
# 256 rows with 128-row blocks make the causal block skipping and the mask-free blocks run.
@pytest.mark.parametrize(
    "shape, dtype, segmented, q_offset",
    [
        ((1, 200, 200, 4, 2, 48), "float32", True, 0),
        ((1, 128, 384, 2, 1, 64), "bfloat16", False, 256),
    ],
    ids=["f32-causal-segments-gqa2-ragged", "bf16-causal-gqa2-q-offset"],
)
def test_our_mosaic_kernel_matches_reference_in_the_tpu_interpreter(
    shape, dtype, segmented, q_offset
):
    _check(flash_attention, shape, dtype, segmented, backend="tpu_interpret", q_offset=q_offset)


def test_our_mosaic_kernel_cut_into_tiles_matches_reference_in_the_tpu_interpreter():
    # 251 tokens (prime): 2 tiles of 128 per side, the last padded by 5 tokens; under the
    # causal mask one whole pair and two diagonal ones.
    _check(
        long_flash_attention,
        (1, 251, 251, 2, 1, 64),
        "bfloat16",
        True,
        backend="tpu_interpret",
        tile_len=128,
    )


def test_splash_matches_reference_with_packed_segments_and_grouped_heads():
    _check(splash_attention, (2, 256, 256, 4, 2, 32), "float32", True, interpret=True)


def test_splash_refuses_lengths_not_in_whole_blocks():
    q = jnp.zeros((1, 200, 2, 16))
    with pytest.raises(ValueError, match="whole 128-row blocks, got 200"):
        splash_attention(q, q, q, interpret=True)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_bench_attention_compiles_splash_and_pallas_for_a_tpu_chip():
    mesh = bench.tpu_mesh("v5e:2x2")
    for impl in ("splash", "pallas"):
        case = bench.Case(impl, "fwd+bwd", 1, 4, 2, 256, 128, True, "bfloat16")
        row = bench.measure(case, mesh=mesh)
        assert "skipped" not in row and row["compile_s"] > 0, row
    row = bench.measure(bench.Case("splash", "fwd", 1, 4, 2, 256, 128, True, "bfloat16"))
    assert row["skipped"] == "splash attention needs a TPU"  # this host is a CPU


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_tiles_let_a_sequence_longer_than_vmem_holds_compile_for_a_tpu_chip():
    """32k tokens of one head (dim 128, bfloat16): one kernel call asks for more scoped VMEM
    than the compiler allows; cut into tiles (`tile_cap`) the same fwd+bwd compiles."""
    mesh = bench.tpu_mesh("v5p:2x2x1")
    x = jax.ShapeDtypeStruct((1, 32768, 1, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def grads(kernel):
        loss = lambda q, k, v: jnp.sum(kernel(q, k, v, backend="tpu").astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x)

    with pytest.raises(Exception, match="(?i)vmem"):
        grads(flash_attention).compile()
    assert "tpu_custom_call" in grads(long_flash_attention).compile().as_text()
