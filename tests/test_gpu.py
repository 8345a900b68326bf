"""On a GPU (benchmarks/gpu.sh runs this; skipped elsewhere): our Pallas flash kernel through
Triton and cuDNN's fused attention, values and gradients against the float32 reference, and
`auto` picking cuDNN."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels_flash_attention import (
    Shape,
    check_case,
    make_inputs,
    rel_err,
    value_and_grads,
)

from jaxlm.models.attention import attend, reference_attention
from jaxlm.models.attention_kernels import auto_impl
from jaxlm.models.backend import target_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

# Real-sized shapes with the GPU's default blocks: ragged lengths, packed documents,
# grouped-query heads, head dims 64 and 128, float32 and bfloat16.
KERNEL_CASES = {
    "f32-causal-segments-gqa4-ragged-e64": Shape(2, 1000, 8, 2, 64, segmented=True),
    "f32-full-mha-e128": Shape(1, 512, 4, 4, 128, causal=False),
    "bf16-causal-segments-gqa2-e128": Shape(2, 2048, 8, 4, 128, segmented=True, dtype="bfloat16"),
    "bf16-causal-mqa-e64": Shape(1, 4096, 8, 1, 64, dtype="bfloat16"),
    "f32-cross-lengths-q-offset": Shape(1, 256, 4, 2, 64, t=768, q_offset=512),
}


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_pallas_kernel_matches_reference_on_gpu(name):
    check_case(KERNEL_CASES[name])


@pytest.mark.parametrize("kv_heads, head_dim", [(8, 64), (2, 128)])
def test_cudnn_matches_reference_with_packed_segments(kv_heads, head_dim):
    shape = Shape(2, 1024, 8, kv_heads, head_dim, segmented=True, dtype="bfloat16")
    q, k, v, d_out, seg = make_inputs(shape)
    scale = head_dim**-0.5
    kw = dict(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg)
    cudnn = lambda q, k, v: attend(q, k, v, impl="cudnn", **kw)  # noqa: E731

    def truth(q, k, v):
        mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((1024, 1024), bool))
        return reference_attention(q, k, v, mask[:, None], scale)

    got = value_and_grads(cudnn, q, k, v, d_out)
    want = value_and_grads(truth, *(x.astype(jnp.float32) for x in (q, k, v)), d_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        assert rel_err(g, w) < 2e-2, (name, rel_err(g, w))


def test_auto_is_cudnn_for_half_precision_on_gpu():
    assert target_backend() == "gpu"
    assert auto_impl("gpu", jnp.dtype(jnp.bfloat16), 128, 1024, 1024) == "cudnn"
    shape = dataclasses.replace(KERNEL_CASES["bf16-causal-segments-gqa2-e128"], s=512)
    q, k, v, _, seg = make_inputs(shape)
    kw = dict(q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg)
    np.testing.assert_array_equal(
        np.asarray(attend(q, k, v, impl="auto", **kw), np.float32),
        np.asarray(attend(q, k, v, impl="cudnn", **kw), np.float32),
    )
