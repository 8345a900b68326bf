"""Mixture-of-experts MLP: token-choice top-k routing over a set of expert MLPs.

The router runs in float32. Each (token, choice) pair is an *assignment*; assignments are
sorted by expert (stable, first choices of all tokens ahead of second choices), then the
experts run in one of two ways:
- dropless (`moe_capacity_factor=0`): each expert's contiguous run of sorted rows goes
  through that expert's weights with `jax.lax.ragged_dot` (a grouped matmul), so no token
  is dropped and no FLOP is spent on padding;
- capacity (c > 0): each expert has a buffer of C = ceil(c * A / X) rows and a batched
  matmul over [X, C, D]; assignments past an expert's C-th are dropped (they add nothing,
  the token keeps its residual). Static shapes, the classic GShard/Switch layout.
Shared experts (DeepSeek) are one dense MLP every token passes through.

Expert weights carry the logical axis `expert` (sharded over `mesh.expert`); XLA's SPMD
partitioner places the grouped matmuls. In training, each call sows its statistics into
the `moe` collection (nothing is stored when the collection is immutable, e.g. in eval or
generation); `moe_metrics` averages them over layers for the train step. Besides the
scalars, each layer sows its load histogram: the share of its assignments each expert got.

Names: B batch, S sequence, T tokens (B*S), D d_model, F expert width, X experts,
K top-k, A assignments (K*T), C capacity.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.models.layers import Mlp, dtype_of, normal_init

MOE = "moe"  # the collection the MoE layers sow their statistics into
STATS = ("aux_loss", "z_loss", "dropped", "max_load")
METRICS = tuple(f"moe_{name}" for name in STATS)  # the scalars `moe_metrics` returns
LOAD = "load"  # the per-expert share of assignments, sown as a vector [X]


def load_keys(n_experts: int) -> tuple[str, ...]:
    """The metric names of the load histogram: moe_load_0 ... moe_load_{X-1}."""
    return tuple(f"moe_{LOAD}_{e}" for e in range(n_experts))


def metric_names(n_experts: int) -> tuple[str, ...]:
    """Every metric `moe_metrics` returns for a model with `n_experts` experts."""
    return METRICS + load_keys(n_experts)


class Routing(NamedTuple):
    """Which expert each assignment goes to, with what gate, and the router's losses."""

    expert_A: jax.Array  # int32, assignment a = j*T + t is token t's j-th choice
    gate_A: jax.Array  # float32
    aux_loss: jax.Array  # load balance, 1.0 when perfectly balanced
    z_loss: jax.Array  # mean log(Z)^2 of the router logits


def route(logits_TxX: jax.Array, top_k: int, router: str = "softmax") -> Routing:
    """Top-k experts per token, their gates, and the load-balancing and z losses.

    softmax: gates are probabilities; sigmoid: independent scores (DeepSeek-V3). With k > 1
    the chosen gates are renormalised to sum to 1; with k = 1 they are kept raw, so the
    router still gets a gradient through the one gate (Switch).
    """
    logits_TxX = logits_TxX.astype(jnp.float32)
    t, x = logits_TxX.shape
    if router == "sigmoid":
        scores_TxX = jax.nn.sigmoid(logits_TxX)
        probs_TxX = scores_TxX / jnp.sum(scores_TxX, axis=-1, keepdims=True)
    else:
        scores_TxX = probs_TxX = jax.nn.softmax(logits_TxX, axis=-1)
    gate_TxK, expert_TxK = jax.lax.top_k(scores_TxX, top_k)
    if top_k > 1:
        gate_TxK = gate_TxK / jnp.sum(gate_TxK, axis=-1, keepdims=True)
    expert_A = expert_TxK.T.reshape(-1).astype(jnp.int32)  # choice-major order
    # Switch/GShard balance: X * sum_e (share of assignments to e) * (mean prob of e). Only
    # the probabilities carry a gradient; it is 1 whenever either factor is uniform.
    share_X = jnp.bincount(expert_A, length=x).astype(jnp.float32) / (t * top_k)
    aux_loss = x * jnp.sum(share_X * jnp.mean(probs_TxX, axis=0))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxX, axis=-1)))
    return Routing(expert_A, gate_TxK.T.reshape(-1), aux_loss, z_loss)


def capacity(n_assignments: int, n_experts: int, factor: float) -> int:
    """Rows per expert buffer in the capacity variant: ceil(factor * A / X), at least 1."""
    return max(1, math.ceil(factor * n_assignments / n_experts))


class ExpertWeights(NamedTuple):
    """Stacked expert parameters: gate (swiglu only), up and down kernels, optional biases."""

    gate_XxDxF: jax.Array | None
    up_XxDxF: jax.Array
    down_XxFxD: jax.Array
    up_bias_XxF: jax.Array | None
    down_bias_XxD: jax.Array | None


def _hidden(pre_gate, pre_up, kind: str):
    return nn.silu(pre_gate) * pre_up if kind == "swiglu" else nn.gelu(pre_up)


def experts_dropless(
    x_AxD: jax.Array, expert_A: jax.Array, group_sizes_X: jax.Array, w: ExpertWeights, kind: str
) -> jax.Array:
    """Rows sorted by expert through their experts' MLPs, as grouped matmuls."""
    mm = lambda a, k: jax.lax.ragged_dot(a, k.astype(a.dtype), group_sizes_X)  # noqa: E731
    up_AxF = mm(x_AxD, w.up_XxDxF)
    if w.up_bias_XxF is not None:
        up_AxF = up_AxF + w.up_bias_XxF.astype(x_AxD.dtype)[expert_A]
    gate_AxF = None if w.gate_XxDxF is None else mm(x_AxD, w.gate_XxDxF)
    out_AxD = mm(_hidden(gate_AxF, up_AxF, kind), w.down_XxFxD)
    if w.down_bias_XxD is not None:
        out_AxD = out_AxD + w.down_bias_XxD.astype(x_AxD.dtype)[expert_A]
    return out_AxD


def experts_batched(x_XxCxD: jax.Array, w: ExpertWeights, kind: str) -> jax.Array:
    """Each expert's fixed-size buffer through its MLP, as one batched matmul."""
    dt = x_XxCxD.dtype
    mm = lambda a, k: jnp.einsum("xcd,xdf->xcf", a, k.astype(dt))  # noqa: E731
    up_XxCxF = mm(x_XxCxD, w.up_XxDxF)
    if w.up_bias_XxF is not None:
        up_XxCxF = up_XxCxF + w.up_bias_XxF.astype(dt)[:, None, :]
    gate_XxCxF = None if w.gate_XxDxF is None else mm(x_XxCxD, w.gate_XxDxF)
    h_XxCxF = nn.with_logical_constraint(
        _hidden(gate_XxCxF, up_XxCxF, kind), ("act_expert", None, "act_mlp")
    )
    out_XxCxD = mm(h_XxCxF, w.down_XxFxD)
    if w.down_bias_XxD is not None:
        out_XxCxD = out_XxCxD + w.down_bias_XxD.astype(dt)[:, None, :]
    return out_XxCxD


def moe_apply(
    x_TxD: jax.Array,
    routing: Routing,
    w: ExpertWeights,
    kind: str,
    top_k: int,
    capacity_factor: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """(out_TxD, dropped fraction): the gate-weighted sum of each token's experts' outputs."""
    t, d = x_TxD.shape
    x = w.up_XxDxF.shape[0]
    a = t * top_k
    order_A = jnp.argsort(routing.expert_A, stable=True)
    expert_A = routing.expert_A[order_A]  # sorted: each expert's rows are contiguous
    x_AxD = x_TxD[order_A % t]
    group_sizes_X = jnp.bincount(routing.expert_A, length=x).astype(jnp.int32)
    if capacity_factor <= 0:
        out_AxD = experts_dropless(x_AxD, expert_A, group_sizes_X, w, kind)
        dropped = jnp.zeros((), jnp.float32)
    else:
        c = capacity(a, x, capacity_factor)
        starts_X = jnp.cumsum(group_sizes_X) - group_sizes_X
        rank_A = jnp.arange(a, dtype=jnp.int32) - starts_X[expert_A]
        keep_A = rank_A < c
        # Dropped rows go to one spare slot past the buffers, which is then cut off (in)
        # or reads back zeros (out).
        slot_A = jnp.where(keep_A, expert_A * c + rank_A, x * c)
        buf = jnp.zeros((x * c + 1, d), x_TxD.dtype).at[slot_A].set(x_AxD)
        buf_XxCxD = nn.with_logical_constraint(
            buf[: x * c].reshape(x, c, d), ("act_expert", None, "act_embed")
        )
        out_XxCxD = experts_batched(buf_XxCxD, w, kind)
        out_rows = jnp.concatenate([out_XxCxD.reshape(x * c, d), jnp.zeros((1, d), x_TxD.dtype)])
        out_AxD = out_rows[slot_A]
        dropped = 1.0 - jnp.mean(keep_A.astype(jnp.float32))
    # Undo the sort, weight by the gates (float32) and sum each token's K choices.
    unsorted_AxD = out_AxD[jnp.argsort(order_A)].astype(jnp.float32)
    weighted_KxTxD = (unsorted_AxD * routing.gate_A[:, None]).reshape(top_k, t, d)
    return jnp.sum(weighted_KxTxD, axis=0).astype(x_TxD.dtype), dropped


class MoeMlp(nn.Module):
    """x_BxSxD -> x_BxSxD through the top-k routed experts (+ shared experts)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        b, s, d = x_BxSxD.shape
        n, f, kind = cfg.moe_experts, cfg.moe_ff_dim, cfg.mlp
        dtype = dtype_of(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # as lm.out_init_std
        router_DxX = self.param(
            "router", normal_init(cfg.init_std, ("embed", None)), (d, n), jnp.float32
        )

        def kernel(name, shape, axes, std):
            return self.param(name, normal_init(std, axes), shape, jnp.float32)

        def bias(name, shape, axes):
            if not cfg.bias:
                return None
            zeros = nn.with_logical_partitioning(nn.initializers.zeros, axes)
            return self.param(name, zeros, shape, jnp.float32)

        in_axes = ("expert", "embed", "mlp")
        w = ExpertWeights(
            gate_XxDxF=kernel("gate", (n, d, f), in_axes, cfg.init_std)
            if kind == "swiglu"
            else None,
            up_XxDxF=kernel("up", (n, d, f), in_axes, cfg.init_std),
            down_XxFxD=kernel("down", (n, f, d), ("expert", "mlp", "embed"), out_std),
            up_bias_XxF=bias("up_bias", (n, f), ("expert", "mlp")),
            down_bias_XxD=bias("down_bias", (n, d), ("expert", "embed")),
        )
        x_TxD = x_BxSxD.reshape(b * s, d)
        logits_TxX = jnp.dot(
            x_TxD.astype(jnp.float32), router_DxX, precision=jax.lax.Precision.HIGHEST
        )
        routing = route(logits_TxX, cfg.moe_top_k, cfg.moe_router)
        out_TxD, dropped = moe_apply(
            x_TxD, routing, w, kind, cfg.moe_top_k, cfg.moe_capacity_factor
        )
        out_BxSxD = out_TxD.reshape(b, s, d)
        if cfg.moe_shared_experts:
            shared = Mlp(
                d, cfg.moe_shared_experts * f, kind, cfg.bias, cfg.init_std, out_std, 0.0, dtype,
                name="shared",
            )  # fmt: skip
            out_BxSxD = out_BxSxD + shared(x_BxSxD, deterministic)
        if not self.is_initializing():
            counts_X = jnp.bincount(routing.expert_A, length=n).astype(jnp.float32)
            share_X = counts_X / routing.expert_A.shape[0]  # sums to 1; uniform is 1/X
            for name, value in zip(
                (*STATS, LOAD),
                (routing.aux_loss, routing.z_loss, dropped, n * jnp.max(share_X), share_X),
                strict=True,
            ):
                self.sow(MOE, name, value.astype(jnp.float32))
        return nn.Dropout(cfg.dropout)(out_BxSxD, deterministic=deterministic)


def moe_metrics(collection: Any) -> dict[str, jax.Array]:
    """{moe_<stat>: its mean over the MoE layers, moe_load_<e>: expert e's mean share of
    assignments} from the sown `moe` collection."""
    values: dict[str, list[jax.Array]] = {name: [] for name in (*STATS, LOAD)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(collection):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        # A scanned stack sows one value (or one load vector) per layer.
        values[name].append(leaf.reshape(-1, leaf.shape[-1]) if name == LOAD else jnp.ravel(leaf))
    loads = values.pop(LOAD)
    out = {f"moe_{name}": jnp.mean(jnp.concatenate(vs)) for name, vs in values.items() if vs}
    if loads:
        load_X = jnp.mean(jnp.concatenate(loads), axis=0)
        out.update(zip(load_keys(load_X.shape[0]), load_X, strict=True))
    return out
