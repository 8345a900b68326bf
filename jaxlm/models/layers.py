"""Building blocks shared by the language models: dense, norms, MLPs, rotary positions.

Every parameter is created through `nn.with_logical_partitioning`, so it carries logical
axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`) that
`jaxlm.parallel.sharding` maps to mesh axes. Array names carry their shapes: B batch, S sequence, D d_model, F MLP
width, H query heads, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.backend import uses
from jaxlm.models.lora import adapter_params, add_lora

Dtype = jnp.dtype


def dtype_of(name: str) -> Dtype:
    """Map a config dtype name to a JAX dtype."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def normal_init(std: float, axes: Sequence[str | None]):
    """A truncated-free normal initialiser tagged with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), tuple(axes))


class Dense(nn.Module):
    """x @ kernel (+ bias) contracting `axis`; kernel and bias carry logical axis names.

    The kernel is created directly in its final shape (not flattened and reshaped), so its
    logical sharding applies from the first moment it exists. Parameters are float32; the
    matmul runs in `dtype`. When the contracted axes are the trailing ones (every use in
    jaxlm) the matmul goes through `stacked_dense`, which on CPU takes a hand-written backward:
    with autodiff's own form, XLA's CPU compiler ran the head's kernel gradient at half speed (transposing the
    logits gradient first); this made the bench-cpu step about 4% faster. With `lora_rank`
    a LoRA adapter (jaxlm.models.lora) adds `lora_scale` (x A) B.
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    std: float = 0.02
    dtype: Dtype = jnp.float32
    lora_rank: int = 0
    lora_scale: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        in_shape = tuple(x.shape[a] for a in axes)
        kernel = self.param(
            "kernel", normal_init(self.std, self.kernel_axes), in_shape + features, jnp.float32
        )
        x_LxN = None
        if axes == tuple(range(x.ndim - len(axes), x.ndim)):  # trailing axes: flatten them
            n_in = math.prod(in_shape)
            x_LxN = x.reshape(*x.shape[: x.ndim - len(axes)], n_in)
            (y,) = stacked_dense(x_LxN, [kernel.reshape(n_in, *features)], [None], self.dtype)
        else:
            if self.lora_rank:
                raise ValueError("LoRA adapters need a Dense that contracts its trailing axes")
            y = jax.lax.dot_general(
                x.astype(self.dtype),
                kernel.astype(self.dtype),
                ((axes, tuple(range(len(axes)))), ((), ())),
            )
        if self.use_bias:
            bias_axes = self.kernel_axes[-len(features) :]
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        if self.lora_rank:
            adapter = adapter_params(self, in_shape, features, self.kernel_axes, self.lora_rank)
            y = add_lora(y, x_LxN, adapter, self.lora_scale, self.dtype)
        return y


class Kernel(nn.Module):
    """A Dense layer's parameters (kernel, bias or None, LoRA (A, B) or None) without the
    matmul, for fusing.

    Its parameter names and shapes are exactly those of `Dense` under the same module name,
    so a fused and an unfused model share one parameter layout.
    """

    in_shape: tuple[int, ...]
    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = False
    std: float = 0.02
    lora_rank: int = 0

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, jax.Array] | None]:
        kernel = self.param(
            "kernel",
            normal_init(self.std, self.kernel_axes),
            self.in_shape + self.features,
            jnp.float32,
        )
        bias = None
        if self.use_bias:
            bias_axes = self.kernel_axes[-len(self.features) :]
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, bias_axes)
            bias = self.param("bias", zeros, self.features, jnp.float32)
        adapter = None
        if self.lora_rank:
            adapter = adapter_params(
                self, self.in_shape, self.features, self.kernel_axes, self.lora_rank
            )
        return kernel, bias, adapter


def stacked_dense(
    x_LxD: jax.Array, kernels: list[jax.Array], biases: list[jax.Array | None], dtype: Dtype
) -> list[jax.Array]:
    """x @ k for one or several same-shape kernels [D, ...], as ONE matmul over the stack.

    x_LxD has any leading dims L. Stacking on a new axis (rather than concatenating) keeps
    each kernel's sharded axes intact, so tensor parallelism needs no resharding; on CPU one
    bigger forward matmul runs closer to the machine's peak than several small ones. The
    backward pass works per kernel (see `_stacked_matmul_bwd`). Both are CPU measurements,
    so other platforms get plain per-kernel matmuls (jaxlm.models.backend.TRICKS).
    """
    precision = jax.config.jax_default_matmul_precision  # custom_vjp's bwd is traced later
    x_LxD = x_LxD.astype(dtype)
    kernels = [k.astype(dtype) for k in kernels]
    if uses("stacked_vjp"):
        outs = _stacked_matmul(precision, x_LxD, *kernels)
    else:  # one plain matmul per kernel: what XLA's own fusion and autodiff expect elsewhere
        lead = x_LxD.ndim - 1
        dims = (((lead,), (0,)), ((), ()))
        outs = [jax.lax.dot_general(x_LxD, k, dims, precision=precision) for k in kernels]
    return [y if b is None else y + b.astype(dtype) for y, b in zip(outs, biases, strict=True)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stacked_matmul(precision, x_LxD: jax.Array, *kernels: jax.Array) -> tuple[jax.Array, ...]:
    lead = x_LxD.ndim - 1
    if len(kernels) == 1:
        k = kernels[0]
        return (jax.lax.dot_general(x_LxD, k, (((lead,), (0,)), ((), ())), precision=precision),)
    k_DxNx_ = jnp.stack(kernels, axis=1)
    y_LxNx_ = jax.lax.dot_general(x_LxD, k_DxNx_, (((lead,), (0,)), ((), ())), precision=precision)
    return tuple(y.squeeze(lead) for y in jax.lax.split(y_LxNx_, [1] * len(kernels), axis=lead))


def _stacked_matmul_fwd(precision, x_LxD, *kernels):
    return _stacked_matmul(precision, x_LxD, *kernels), (x_LxD, kernels)


def _stacked_matmul_bwd(precision, residuals, grads):
    """Gradients kernel by kernel.

    Differentiating the stacked forward would copy the cotangents into one stacked array
    and slice the stacked kernel gradient apart again; on CPU those copies cost more than
    the bigger backward matmuls gain (the whole bench-cpu step measured ~4% faster).
    Kernel gradients contract over all T tokens as x^T @ g; an explicit transposed copy of
    x was measured slower.
    """
    x_LxD, kernels = residuals
    d = x_LxD.shape[-1]
    x_TxD = x_LxD.reshape(-1, d)
    dx_LxD = None
    dkernels = []
    for k, g in zip(kernels, grads, strict=True):
        out = tuple(range(x_LxD.ndim - 1, g.ndim))
        dx = jax.lax.dot_general(
            g, k, ((out, tuple(range(1, k.ndim))), ((), ())), precision=precision
        )
        dx_LxD = dx if dx_LxD is None else dx_LxD + dx
        g_TxF = g.reshape(x_TxD.shape[0], -1)
        dk = jax.lax.dot_general(x_TxD, g_TxF, (((0,), (0,)), ((), ())), precision=precision)
        dkernels.append(dk.reshape(k.shape))
    return (dx_LxD, *dkernels)


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


class Norm(nn.Module):
    """LayerNorm or RMSNorm computed in float32, returned in the compute dtype."""

    kind: str = "rmsnorm"
    eps: float = 1e-5
    use_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array) -> jax.Array:
        ones = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        if self.kind == "layernorm":
            norm = nn.LayerNorm(
                epsilon=self.eps,
                use_bias=self.use_bias,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                scale_init=ones,
                bias_init=zeros,
            )
        else:
            norm = nn.RMSNorm(
                epsilon=self.eps, dtype=jnp.float32, param_dtype=jnp.float32, scale_init=ones
            )
        return norm(x_BxSxD.astype(jnp.float32)).astype(self.dtype)


class Mlp(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama), Megatron-shardable over the `mlp` axis."""

    d_model: int
    d_ff: int
    kind: str = "swiglu"
    use_bias: bool = False
    std: float = 0.02
    out_std: float = 0.02
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    lora_rank: int = 0  # LoRA adapters on every kernel (jaxlm.models.lora)
    lora_scale: float = 0.0

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, deterministic: bool = True) -> jax.Array:
        dense = lambda f, axes, std, name: Dense(  # noqa: E731
            f,
            axes,
            use_bias=self.use_bias,
            std=std,
            dtype=self.dtype,
            lora_rank=self.lora_rank,
            lora_scale=self.lora_scale,
            name=name,
        )
        if self.kind == "swiglu":
            params = lambda name: Kernel(  # noqa: E731
                (self.d_model,),
                (self.d_ff,),
                ("embed", "mlp"),
                self.use_bias,
                self.std,
                self.lora_rank,
                name=name,
            )()
            (wg, bg, ag), (wu, bu, au) = params("gate"), params("up")
            gate_BxSxF, up_BxSxF = stacked_dense(x_BxSxD, [wg, wu], [bg, bu], self.dtype)
            gate_BxSxF = add_lora(gate_BxSxF, x_BxSxD, ag, self.lora_scale, self.dtype)
            up_BxSxF = add_lora(up_BxSxF, x_BxSxD, au, self.lora_scale, self.dtype)
            h_BxSxF = nn.silu(gate_BxSxF) * up_BxSxF
        else:
            h_BxSxF = nn.gelu(dense(self.d_ff, ("embed", "mlp"), self.std, "up")(x_BxSxD))
        h_BxSxF = nn.with_logical_constraint(h_BxSxF, ("batch", "length", "act_mlp"))
        out_BxSxD = dense(self.d_model, ("mlp", "embed"), self.out_std, "down")(h_BxSxF)
        return nn.Dropout(self.dropout)(out_BxSxD, deterministic=deterministic)


def rotary(x_BxSxNxE: jax.Array, positions_BxS: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs of features by position-dependent angles (RoPE, Su et al. 2021).

    Uses the "half-split" pairing (feature i with i + E/2). Angles are computed in float32
    so long positions keep their precision in bfloat16 runs.
    """
    e = x_BxSxNxE.shape[-1]
    inv_freq_E2 = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    angle_BxSxE2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq_E2
    # On CPU a barrier makes XLA compute the [B, S, E/2] tables once. Without it the compiler
    # fused sin and cos into the rotation itself and evaluated them again for every head
    # and feature, forward and backward (about 3% of the bench-cpu train step).
    sin_cos_2xBxSxE2 = jnp.stack([jnp.sin(angle_BxSxE2), jnp.cos(angle_BxSxE2)])
    if uses("rotary_barrier"):
        sin_cos_2xBxSxE2 = jax.lax.optimization_barrier(sin_cos_2xBxSxE2)
    sin_BxSx1xE2 = sin_cos_2xBxSxE2[0][:, :, None, :]
    cos_BxSx1xE2 = sin_cos_2xBxSxE2[1][:, :, None, :]
    x1, x2 = jnp.split(x_BxSxNxE.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate(
        [x1 * cos_BxSx1xE2 - x2 * sin_BxSx1xE2, x2 * cos_BxSx1xE2 + x1 * sin_BxSx1xE2], axis=-1
    )
    return out.astype(x_BxSxNxE.dtype)
