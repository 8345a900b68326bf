"""LoRA (Hu et al., 2021): low-rank adapters beside frozen base kernels.

An adapted kernel W [in..., out...] gains two parameters in its own module: `lora_a`
[in..., r] (normal, std 1/sqrt(in)) and `lora_b` [r, out...] (zeros), so the layer computes
x W + (alpha/r) (x A) B and the model at init is exactly the base model. A carries the
kernel's input axis names and B its output axis names (the rank axis is `lora`, replicated),
so adapters shard like their base. Which kernels are adapted is `model.lora_targets`:
q, k, v, o (attention projections) and mlp (the dense MLPs' kernels; MoE experts are not).

The functions on parameter trees below tell adapters from base leaves (for the frozen
optimizer partition), merge adapters into their kernels (`jaxlm export --merge-lora`) and
graft fresh adapters onto a plain checkpoint's parameters (`train.init_from`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import DictKey

from jaxlm.config import ModelConfig

LORA_A, LORA_B = "lora_a", "lora_b"
ADAPTERS = (LORA_A, LORA_B)


def lora_rank(cfg: ModelConfig, target: str) -> int:
    """The adapter rank of kernel `target` (q, k, v, o, mlp): 0 unless LoRA adapts it."""
    return cfg.lora_rank if target in cfg.lora_target_set else 0


def lora_scale(cfg: ModelConfig) -> float:
    """alpha / rank, the factor on every adapter's output (0 without LoRA)."""
    return cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0


def adapter_params(
    module: nn.Module,
    in_shape: tuple[int, ...],
    features: tuple[int, ...],
    kernel_axes: tuple[str | None, ...],
    rank: int,
) -> tuple[jax.Array, jax.Array]:
    """Create (A, B) in `module` (inside its compact call, after its kernel and bias)."""
    n = len(in_shape)
    a_init = nn.initializers.normal(stddev=math.prod(in_shape) ** -0.5)
    a = module.param(
        LORA_A,
        nn.with_logical_partitioning(a_init, (*kernel_axes[:n], "lora")),
        (*in_shape, rank),
        jnp.float32,
    )
    b = module.param(
        LORA_B,
        nn.with_logical_partitioning(nn.initializers.zeros, ("lora", *kernel_axes[n:])),
        (rank, *features),
        jnp.float32,
    )
    return a, b


def lora_delta(
    x_LxN: jax.Array, adapter: tuple[jax.Array, jax.Array], scale: float, dtype: Any
) -> jax.Array:
    """scale * (x A) B for x whose last axis is the kernel's flattened input; out [L, out...]."""
    a, b = adapter
    r = a.shape[-1]
    h_LxR = jnp.dot(x_LxN.astype(dtype), a.reshape(-1, r).astype(dtype))
    h_LxR = h_LxR * jnp.asarray(scale, dtype)
    y = jnp.dot(h_LxR, b.reshape(r, -1).astype(dtype))
    return y.reshape(*x_LxN.shape[:-1], *b.shape[1:])


def add_lora(y, x_LxN, adapter, scale: float, dtype: Any):
    """y plus the adapter's output, or y itself without an adapter."""
    return y if adapter is None else y + lora_delta(x_LxN, adapter, scale, dtype)


# --- parameter trees -----------------------------------------------------------------------


def _name(path) -> str | None:
    """The parameter name of a leaf (its last dict key: boxed leaves end in `.value`)."""
    return next((k.key for k in reversed(path) if isinstance(k, DictKey)), None)


def is_adapter(path) -> bool:
    return _name(path) in ADAPTERS


def trainable_mask(params: Any) -> Any:
    """True on adapter leaves, False on the frozen base. On a boxed tree (nn.Partitioned
    leaves) the boxes are the leaves, so optax masks whole boxes, names and all."""
    boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter(p), params, is_leaf=boxed)


def freeze_base(params: Any) -> Any:
    """The base leaves behind stop_gradient: their gradients are zeros nobody computes."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if is_adapter(p) else jax.lax.stop_gradient(x), params
    )


def has_adapters(params: Any) -> bool:
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return any(is_adapter(p) for p, _ in paths)


def split(tree: Any) -> tuple[Any, Any]:
    """(base, adapters) of a nested-dict tree: each keeps only its own leaves."""
    if not isinstance(tree, dict):
        return tree, None
    base, adapters = {}, {}
    for k, v in tree.items():
        if k in ADAPTERS:
            adapters[k] = v
            continue
        b, a = split(v)
        base[k] = b
        if a:
            adapters[k] = a
    return base, adapters


def combine(base: Any, adapters: Any) -> Any:
    """The inverse of `split`: the union of two nested-dict trees."""
    if not isinstance(adapters, dict) or not isinstance(base, dict):
        return base if adapters is None else adapters
    out = dict(base)
    for k, v in adapters.items():
        out[k] = combine(base.get(k), v)
    return out


def merge(params: Any, scale: float) -> Any:
    """The plain model's parameters: each adapted kernel becomes W + scale * A B.

    Works on per-block and scanned (leading `layers` axis) trees alike.
    """
    if not isinstance(params, dict):
        return params
    out = {k: merge(v, scale) for k, v in params.items() if k not in ADAPTERS}
    if LORA_A in params:
        a, b, w = params[LORA_A], params[LORA_B], out["kernel"]
        lead = a.ndim + b.ndim - 2 - w.ndim  # 1 for scanned blocks
        r = a.shape[-1]
        a2 = a.reshape(*a.shape[:lead], -1, r)
        b2 = b.reshape(*b.shape[:lead], r, -1)
        delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        out["kernel"] = w + scale * delta
    return out
