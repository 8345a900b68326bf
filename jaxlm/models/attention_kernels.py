"""The hardware kernels behind `attend`, and the choice of one for the target platform.

Each kernel takes segment ids and causality itself (no S x T mask) and runs per shard of
the ambient mesh. `auto_impl` picks, per backend, the fastest implementation verified
there; `jaxlm.models.backend.target_backend` reads the backend from the devices being compiled for, so an
ahead-of-time compile for a TPU topology on a CPU host (`jaxlm plan`) picks and lowers
TPU kernels, not the CPU ones.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxlm.errors import ConfigError
from jaxlm.kernels.splash import splash_attention as splash_kernel
from jaxlm.kernels.splash import supports as splash_supports
from jaxlm.kernels.tiled_attention import long_flash_attention
from jaxlm.parallel.sharding import BATCH_AXES


def per_shard(fn, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT) -> jax.Array:
    """Run `fn` on each shard of the ambient mesh (batch over data/fsdp, heads over tensor).

    Custom kernels can't be partitioned by XLA, so without this a sharded step would gather
    everything onto each device. Axes that don't divide the array stay whole (replicated).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT)
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
    if not batch or q_BxSxHxE.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = None
    tp = mesh.shape.get("tensor", 1)
    heads = (
        "tensor" if tp > 1 and not q_BxSxHxE.shape[2] % tp and not k_BxTxKxE.shape[2] % tp else None
    )
    spec_4d, spec_2d = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(spec_4d, spec_4d, spec_4d, spec_2d, spec_2d),
        out_specs=spec_4d,
        check_vma=False,  # pallas_call outputs carry no varying-axes type
    )(q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT)


def pallas_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    q_seg_BxS: jax.Array,
    kv_seg_BxT: jax.Array,
    causal: bool,
    q_offset: int,
    scale: float,
    backend: str,
) -> jax.Array:
    """Our Pallas flash kernel (interpret mode on CPU), per shard, lowered for `backend`;
    cut into tiles where one kernel call can't hold a shard's sequence (TPU VMEM)."""
    kernel = functools.partial(long_flash_attention, backend=backend)
    return _segment_kernel_per_shard(
        kernel, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT, causal, q_offset, scale
    )


def _segment_kernel_per_shard(
    kernel, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT, causal, q_offset, scale
) -> jax.Array:
    """`kernel` (flash_attention's keyword interface: segment ids, causal, offset, scale)
    applied to each shard."""
    fn = lambda q, k, v, qs, ks: kernel(  # noqa: E731
        q,
        k,
        v,
        q_segment_ids_BxS=qs,
        kv_segment_ids_BxT=ks,
        causal=causal,
        q_offset=q_offset,
        scale=scale,
    )
    return per_shard(fn, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT)


def cudnn_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    q_seg_BxS: jax.Array,
    kv_seg_BxT: jax.Array,
    causal: bool,
    q_offset: int,
    scale: float,
    backend: str,
) -> jax.Array:
    """cuDNN's fused attention (GPU, float16/bfloat16); segments become an S x T mask."""
    if q_BxSxHxE.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"cuDNN attention needs bfloat16/float16 inputs, got {q_BxSxHxE.dtype}; "
            f"set model.dtype."
        )
    if q_offset:
        raise ValueError("cuDNN attention here supports q_offset=0 only; use xla or pallas.")

    def fn(q, k, v, qs, ks):
        mask = (qs[:, :, None] == ks[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="cudnn"
        )

    return per_shard(fn, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT)


def splash_attention(
    q_BxSxHxE: jax.Array,
    k_BxTxKxE: jax.Array,
    v_BxTxKxE: jax.Array,
    q_seg_BxS: jax.Array,
    kv_seg_BxT: jax.Array,
    causal: bool,
    q_offset: int,
    scale: float,
    backend: str,
) -> jax.Array:
    """JAX's splash kernel (TPU), per shard; `tpu_interpret` runs it on CPU for tests."""
    kernel = functools.partial(splash_kernel, interpret=backend == "tpu_interpret")
    return _segment_kernel_per_shard(
        kernel, q_BxSxHxE, k_BxTxKxE, v_BxTxKxE, q_seg_BxS, kv_seg_BxT, causal, q_offset, scale
    )


# Kernels that take segment ids and causality themselves instead of a materialised mask.
SEGMENT_IMPLEMENTATIONS = {
    "pallas": pallas_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
}
# The platform each hardware-specific implementation needs, and what to use elsewhere.
NEEDS = {"cudnn": ("gpu", "a GPU"), "splash": ("tpu", "a TPU")}


def auto_impl(backend: str, dtype: jnp.dtype, head_dim: int, q_len: int, kv_len: int) -> str:
    """The fastest implementation verified on `backend` that takes these inputs.

    JAX's own kernels where they exist (their authors ran them on that hardware; our Pallas
    kernel has not run on a GPU or TPU yet, so it is opt-in), `xla` where they don't take
    the shapes or dtype, and `dense` on CPU.
    """
    if backend == "gpu":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
    if backend in ("tpu", "tpu_interpret"):
        return "splash" if splash_supports(q_len, kv_len) else "xla"
    return "dense"


def check_impl(impl: str, backend: str) -> None:
    """Raise a one-sentence ConfigError when `impl` can't run on `backend`."""
    if impl in NEEDS and NEEDS[impl][0] != backend.removesuffix("_interpret"):
        raise ConfigError(
            f"model.attention={impl} needs {NEEDS[impl][1]}, but the program is compiled "
            f"for {backend}; use model.attention=auto (it picks the best one there) or xla."
        )
