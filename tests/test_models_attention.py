"""jaxlm.models.attention: the XLA, dense and blocked-causal implementations against the
reference and a naive loop, in values and gradients, with packed rows, grouped-query heads and
queries continuing a cache; which implementation `auto` picks per backend, and that the
backend is the compile target's (a TPU mesh on a CPU host lowers TPU kernels)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_sentence, assert_trees_close
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.bench.report import tpu_devices
from jaxlm.errors import ConfigError
from jaxlm.models.attention import (
    attend,
    attention_mask,
    blocked_causal_attention,
    reference_attention,
)
from jaxlm.models.attention_kernels import auto_impl, check_impl
from jaxlm.models.backend import target_backend
from jaxlm.parallel.sharding import mesh_context

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'), so no TPU topology can be described",
)


def _qkv(seed, b=2, s=12, h=4, k=2, e=8):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(kq, (b, s, h, e)),
        jax.random.normal(kk, (b, s, k, e)),
        jax.random.normal(kv, (b, s, k, e)),
    )


SEGMENTS = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3]])


def _naive_attention(q, k, v, seg, causal):
    """Per query loop in numpy: softmax over the keys it is allowed to see."""
    q, k, v, seg = map(np.asarray, (q, k, v, seg))
    b, s, h, e = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(s):
            allowed = (seg[bi] == seg[bi, i]) & ((not causal) | (np.arange(s) <= i))
            for hi in range(h):
                scores = k[bi, allowed, hi // group] @ q[bi, i, hi] / np.sqrt(e)
                p = np.exp(scores - scores.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, allowed, hi // group]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_attention_impls_agree_with_naive_loop(causal):
    q, k, v = _qkv(0)
    kw = dict(q_segment_ids_BxS=SEGMENTS, kv_segment_ids_BxT=SEGMENTS, causal=causal)
    expected = _naive_attention(q, k, v, SEGMENTS, causal)
    for impl in ("reference", "xla"):
        np.testing.assert_allclose(attend(q, k, v, impl=impl, **kw), expected, atol=1e-5)


def test_attention_impls_have_equal_gradients():
    q, k, v = _qkv(1)
    cot = jax.random.normal(jax.random.PRNGKey(9), q.shape)
    kw = dict(q_segment_ids_BxS=SEGMENTS, kv_segment_ids_BxT=SEGMENTS)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attend(q, k, v, impl=impl, **kw) * cot)

    ref = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    xla = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for g_ref, g_xla in zip(ref, xla, strict=True):
        assert float(jnp.abs(g_ref).max()) > 1e-3
        np.testing.assert_allclose(g_ref, g_xla, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_q_offset_continues_a_sequence(impl):
    """The last query alone, offset to its index, equals the last row of full attention."""
    q, k, v = _qkv(2)
    full = attend(q, k, v, q_segment_ids_BxS=SEGMENTS, kv_segment_ids_BxT=SEGMENTS, impl=impl)
    last = attend(
        q[:, -1:],
        k,
        v,
        q_segment_ids_BxS=SEGMENTS[:, -1:],
        kv_segment_ids_BxT=SEGMENTS,
        q_offset=q.shape[1] - 1,
        impl=impl,
    )
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)
    no_offset = attend(
        q[:, -1:], k, v, q_segment_ids_BxS=SEGMENTS[:, -1:], kv_segment_ids_BxT=SEGMENTS, impl=impl
    )
    assert float(jnp.abs(no_offset[:, 0] - full[:, -1]).max()) > 1e-3


@pytest.mark.parametrize("kv_heads,q_offset", [(4, 0), (2, 0), (2, 3)])
def test_dense_attention_matches_reference(kv_heads, q_offset):
    """The CPU-laid-out attention equals the reference: values and gradients, packed rows,
    grouped-query heads, and queries continuing a cache (q_offset)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    s, t = 5, 5 + q_offset
    q = jax.random.normal(keys[0], (2, s, 4, 8))
    k = jax.random.normal(keys[1], (2, t, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, t, kv_heads, 8))
    kv_seg = jnp.array([[1] * t, [1] * (t - 3) + [2] * 3])
    q_seg = kv_seg[:, q_offset:]

    def run(impl):
        def f(q, k, v):
            out = attend(
                q,
                k,
                v,
                q_segment_ids_BxS=q_seg,
                kv_segment_ids_BxT=kv_seg,
                q_offset=q_offset,
                impl=impl,
            )
            return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape))), out

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out_d), grads_d = run("dense")
    (_, out_r), grads_r = run("reference")
    np.testing.assert_allclose(out_d, out_r, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads_d, grads_r, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize(
    "batch,query_blocks,kv_heads",
    [(2, 2, 4), pytest.param(3, 4, 2, marks=pytest.mark.slow), (2, 3, 4)],  # ~30 s of compile
)
def test_blocked_causal_attention_matches_reference(batch, query_blocks, kv_heads):
    """Cutting causal attention into query blocks (each seeing keys up to its end) and batch
    halves changes no value or gradient: packed rows, grouped heads, an odd batch (no
    halves) and a block count that doesn't divide the length (falls back to one block)."""
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    s = 8
    q = jax.random.normal(keys[0], (batch, s, 4, 8))
    k = jax.random.normal(keys[1], (batch, s, kv_heads, 8))
    v = jax.random.normal(keys[2], (batch, s, kv_heads, 8))
    seg = jnp.array([[1] * s, [1] * 3 + [2] * 5, [1] * 6 + [2] * 2][:batch])
    mask = attention_mask(seg, seg, causal=True)
    probe = jnp.sin(jnp.arange(q.size).reshape(q.shape))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, mask, 0.3, query_blocks=query_blocks)

    def ref(q, k, v):
        return reference_attention(q, k, v, mask, 0.3)

    np.testing.assert_allclose(blocked(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    assert_trees_close(
        jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v),
        jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v),
        atol=2e-6,
        rtol=2e-5,
    )


# --- which implementation runs where: auto per backend, the target read from the mesh ------


@pytest.mark.parametrize(
    "backend, dtype, head_dim, seq, expected",
    [
        ("cpu", jnp.bfloat16, 64, 256, "dense"),
        ("gpu", jnp.bfloat16, 128, 1000, "cudnn"),
        ("gpu", jnp.float32, 64, 256, "xla"),  # cuDNN's fused kernel is half precision only
        ("gpu", jnp.float16, 256, 256, "xla"),  # beyond cuDNN's head dim
        ("tpu", jnp.float32, 64, 256, "splash"),
        ("tpu", jnp.bfloat16, 64, 200, "xla"),  # splash needs whole 128-row blocks
    ],
)
def test_auto_picks_the_fastest_kernel_verified_on_the_backend(
    backend, dtype, head_dim, seq, expected
):
    assert auto_impl(backend, jnp.dtype(dtype), head_dim, seq, seq) == expected


@pytest.mark.parametrize(
    "impl, backend, needs", [("splash", "cpu", "a TPU"), ("cudnn", "tpu", "a GPU")]
)
def test_a_kernel_for_other_hardware_is_refused_in_one_sentence(impl, backend, needs):
    with pytest.raises(ConfigError) as err:
        attend(*_qkv(0), q_segment_ids_BxS=SEGMENTS, kv_segment_ids_BxT=SEGMENTS, impl=impl,
               backend=backend)  # fmt: skip
    assert f"model.attention={impl} needs {needs}" in str(err.value)
    assert "model.attention=auto" in str(err.value)
    assert_one_sentence(str(err.value))
    check_impl("pallas", "cpu")  # our kernel runs everywhere (interpreted on CPU)


def test_auto_through_the_tpu_interpreter_is_splash_and_matches_the_reference():
    q, k, v = _qkv(3, b=1, s=128, h=4, k=2, e=16)
    seg = jnp.asarray(np.repeat([[1, 2]], 64, axis=1))
    kw = dict(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg)
    got = attend(q, k, v, impl="auto", backend="tpu_interpret", **kw)
    np.testing.assert_allclose(got, attend(q, k, v, impl="reference", **kw), atol=2e-5)


@needs_libtpu
@pytest.mark.parametrize("impl, kernel", [("pallas", "flash_fwd"), ("auto", "splash_mha_fwd")])
def test_attention_under_a_tpu_mesh_lowers_mosaic_kernels_on_a_cpu_host(impl, kernel):
    """The target is the mesh's platform, not JAX's default (CPU here): our kernel and
    splash become TPU custom calls (forward, dq, dk/dv), not interpreter loops."""
    mesh = Mesh(np.asarray(tpu_devices("v5e:2x2")), ("data",))
    assert target_backend() == "cpu"
    with mesh_context(mesh):
        assert target_backend() == "tpu"

    def loss(q, k, v, seg):
        with mesh_context(mesh):
            out = attend(q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, impl=impl)
        return jnp.sum(out.astype(jnp.float32))

    rows = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((4, 128, 2, 64), jnp.bfloat16, sharding=rows)] * 3
    args.append(jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=rows))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).as_text()
    assert text.count("tpu_custom_call") == 3 and kernel in text
    assert "stablehlo.while" not in text  # an interpreted Pallas kernel would be a loop
