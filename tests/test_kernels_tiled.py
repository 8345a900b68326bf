"""Tiled flash attention (jaxlm.kernels.tiled_attention): cutting the queries and keys into
tiles, one kernel call per tile pair, gives the whole attention and its gradients; the
tile cap follows the kernels' VMEM use on TPU and is absent elsewhere."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.kernels.flash_attention import (
    flash_attention_backward,
    flash_attention_lse,
    reference_attention,
)
from jaxlm.kernels.tiled_attention import (
    attend_tiled,
    grad_tiled,
    long_flash_attention,
    pick_tile,
    tile_cap,
)

B, S, H, KV, E = 2, 32, 4, 2, 8


def _inputs(s=S):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, s, h, E)), jnp.float32) for h in (H, KV, KV))
    seg = np.sort(rng.integers(1, 4, (B, s)), axis=1)
    seg[:, -3:] = 0  # padding
    return q, k, v, jnp.asarray(seg, jnp.int32), jnp.asarray(rng.normal(size=(B, s, H, E)))


@pytest.mark.parametrize(
    "causal, s, segmented",
    [(True, S, True), (False, S, True), (True, 29, True), (False, 29, False), (False, 29, True)],
    ids=["causal", "full", "causal-padded", "full-padded", "full-padded-segments"],
)
def test_tiled_attention_equals_the_reference_forward_and_gradients(causal, s, segmented):
    q, k, v, seg, ct = _inputs(s)
    seg = seg if segmented else None

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v, q_segment_ids_BxS=seg, kv_segment_ids_BxT=seg, causal=causal)
            return jnp.sum(out * ct), out

        return jax.value_and_grad(f, (0, 1, 2), has_aux=True)(q, k, v)

    (_, ref), ref_grads = loss(reference_attention)
    # 4 tiles of 8: 10 pairs under the causal mask (4 of them on the diagonal), else 16.
    # 29 tokens: the same 4 tiles, the last one padded with 3 tokens no real query sees.
    (_, out), grads = loss(functools.partial(long_flash_attention, tile_len=8, backend="cpu"))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_tiled_pieces_of_unequal_lengths_equal_one_kernel_call():
    # The ring's off-diagonal pairs: 24 queries against 13 keys, no mask, tiles of 8.
    q, k, v, _, do = _inputs(24)
    k, v = k[:, :13], v[:, :13]
    kw = {"causal": False, "backend": "cpu"}
    o, lse = attend_tiled(q, k, v, None, None, tile=8, **kw)
    ref_o, ref_lse = flash_attention_lse(q, k, v, **kw)
    np.testing.assert_allclose(o, ref_o, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-5)
    grads = grad_tiled(q, k, v, o, lse, do, None, None, tile=8, **kw)
    ref_grads = flash_attention_backward(q, k, v, ref_o, ref_lse, do, **kw)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_tile_cap_holds_a_kernel_call_in_tpu_scoped_vmem_and_nothing_elsewhere():
    # Llama-2-7B heads (128 wide, bfloat16, no GQA): the TPU compiler refused a 16k-token
    # kernel call (16.6 MiB of scoped VMEM over the 16 MiB default; jaxlm plan, v5p).
    cap = tile_cap(128, jnp.bfloat16, 1, "tpu")
    assert 8192 <= cap < 16384 and cap % 128 == 0
    assert tile_cap(128, jnp.float32, 1, "tpu") < cap  # wider rows, fewer tokens
    assert tile_cap(128, jnp.bfloat16, 8, "tpu") < cap  # 8 query heads per kv head
    assert tile_cap(128, jnp.bfloat16, 1, "gpu") is None
    assert tile_cap(128, jnp.bfloat16, 1, "cpu") is None


@pytest.mark.parametrize(
    "length, cap, tile",
    [
        (64, None, None),
        (64, 64, None),
        (64, 40, 32),
        (96, 40, 32),
        (7, 3, 3),  # no even cut into 3 to 6 pieces: tiles of 3, the last padded
        (13, 8, 7),
        (10243, 10240, 5248),  # a prime length: two tiles of 41 blocks of 128
    ],
)
def test_pick_tile_cuts_evenly_into_the_longest_tiles_under_the_cap(length, cap, tile):
    assert pick_tile(length, cap) == tile


def test_tiled_causal_attention_refuses_unequal_lengths_even_where_padding_would_hide_it():
    q, k, v, _, _ = _inputs(13)
    with pytest.raises(ValueError, match="equal query and key lengths, got 13, 15"):
        attend_tiled(q, jnp.pad(k, ((0, 0), (0, 2), (0, 0), (0, 0))), v, None, None,
                     causal=True, tile=8, backend="cpu")  # fmt: skip
