"""Pure train and eval steps, and their jit-compiled, sharded forms.

`train_step(state, batch) -> (state, metrics)` has no side effects; metrics come back as
device arrays so the loop can read them later without stalling the device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxlm.config import RunConfig
from jaxlm.kernels.ring_attention import zigzag
from jaxlm.models.lm import head_logits, head_weight
from jaxlm.models.lora import freeze_base
from jaxlm.models.moe import MOE, metric_names, moe_metrics
from jaxlm.parallel.sharding import LOGICAL_RULES, batch_sharding, mesh_context, replicated
from jaxlm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
from jaxlm.train.optimizer import lr_schedule
from jaxlm.train.state import TrainState

Batch = dict[str, jax.Array]


def _loss_sums(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rng: jax.Array | None,
    moe_stats: bool = False,
    loss_chunk: int = 0,
):
    """Forward one (micro)batch; returns (ce_sum, z_sum, n_tokens, moe), where `moe` holds
    the MoE layers' statistics if `moe_stats` and the model has experts ({} otherwise).

    With `loss_chunk` > 0 the model stops before its head and the loss applies the head
    `loss_chunk` tokens at a time (jaxlm.train.loss.chunked_cross_entropy_sums).
    """
    # Only a MoE model collects what its layers sow: a dense model's trace stays exactly
    # what it was before MoE existed.
    cfg = getattr(model, "cfg", None)
    collect = moe_stats and getattr(cfg, "moe_experts", 0) > 0
    batch = context_layout(batch, getattr(cfg, "context_parallel", "none"))
    with _matmul_precision(model):
        out = model.apply(
            {"params": params},
            batch["inputs"],
            batch["positions"],
            batch["segment_ids"],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
            mutable=[MOE] if collect else False,
            **({"return_hidden": True} if loss_chunk else {}),
        )
        out_BxSx_, moe = (out[0], moe_metrics(out[1][MOE])) if collect else (out, {})
        with jax.named_scope("loss"):  # names the cross-entropy's ops in profiler traces
            if loss_chunk:
                head = functools.partial(head_logits, cfg)
                sums = chunked_cross_entropy_sums(
                    out_BxSx_,
                    head,
                    head_weight(cfg, params),
                    batch["targets"],
                    batch["weights"],
                    loss_chunk,
                )
            else:
                sums = cross_entropy_sums(out_BxSx_, batch["targets"], batch["weights"])
    return (*sums, moe)


# The [B, S] arrays a language-model batch carries, one entry per token.
TOKEN_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


def context_layout(batch: Batch, context_parallel: str) -> Batch:
    """With context parallelism, every token array in zig-zag order over mesh.sequence.

    Sequence device i then holds chunks i and 2n-1-i of the sequence (the layout the ring
    and all-gather attention take, jaxlm.kernels.ring_attention), so neither the model nor
    the loss ever gathers along the sequence. Permuting tokens changes nothing else: the
    loss is a token-weighted sum and positions (rotary or learned) travel with their tokens.
    The batch arrives split by rows only, so each device permutes its own rows locally.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else mesh.shape.get("sequence", 1)
    if context_parallel == "none" or n == 1:  # one chunk pair: zig-zag is the identity
        return batch
    return {k: zigzag(x, n) if k in TOKEN_KEYS else x for k, x in batch.items()}


def _matmul_precision(model: nn.Module):
    """The model's `matmul_precision` for every matmul traced inside (default: XLA's choice).

    Set while tracing, it reaches the backward pass too: JAX records the precision on each
    dot it traces.
    """
    precision = getattr(getattr(model, "cfg", None), "matmul_precision", "default")
    if precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def _split_microbatches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...] taking rows i::k, so each device keeps its own rows."""

    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def make_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    dropout: bool = False,
    schedule: optax.Schedule | None = None,
    token_means: tuple[str, ...] = (),
) -> StepFn:
    """Build a pure step from `loss_fn(params, batch, rng) -> (objective_sum, sums)`.

    The objective and `sums["loss"]` are sums over the batch's `weights` (tokens, examples);
    the step minimises their mean over the whole (accumulated) batch and reports it as
    "loss", beside "grad_norm", the other entries of `sums` (summed; those named in
    `token_means` are weighted sums too, reported as means like the loss) and the "lr" of
    `schedule`. `rng` is None unless `dropout`.
    """

    def objective(params, mb, rng, denom):
        total, sums = loss_fn(params, mb, rng)
        return total / denom, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def microbatch_sums(params, batch, rng):  # traced by eval_shape only: for the shapes
        mb = jax.tree.map(lambda x: x[: x.shape[0] // microbatches], batch)
        return loss_fn(params, mb, rng)[1]

    def train_step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step) if dropout else None
        # The total weight of the whole batch is known before the forward pass. One batch
        # divides its loss by it, so the 1/n rides on the scalar cotangent instead of costing
        # a pass over the gradients; microbatches sum raw gradients and divide once, so
        # accumulation stays equal to one big batch.
        denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
        if microbatches == 1:
            (_, sums), grads = grad_fn(state.params, batch, rng, denom)
        else:

            def body(carry, xs):
                g_acc, sums_acc = carry
                mb, i = xs
                mb_rng = None if rng is None else jax.random.fold_in(rng, i)
                (_, mb_sums), g = grad_fn(state.params, mb, mb_rng, 1.0)
                return (
                    jax.tree.map(jnp.add, g_acc, g),
                    jax.tree.map(jnp.add, sums_acc, mb_sums),
                ), None

            sums_shape = jax.eval_shape(microbatch_sums, state.params, batch, rng)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
            xs = (_split_microbatches(batch, microbatches), jnp.arange(microbatches))
            (grads, sums), _ = jax.lax.scan(body, init, xs)
            grads = jax.tree.map(lambda g: g / denom, grads)
        with jax.named_scope("optimizer"):  # names the update's ops in profiler traces
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {**sums, "loss": sums["loss"] / denom, "grad_norm": optax.tree.norm(grads)}
        metrics.update({k: sums[k] / denom for k in token_means})
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    microbatches: int = 1,
    z_loss: float = 0.0,
    dropout: bool = False,
    schedule: optax.Schedule | None = None,
    loss_chunk: int = 0,
) -> StepFn:
    """The LM step: token-weighted mean cross-entropy (+ z-loss in the gradient only).

    A mixture-of-experts model adds its load-balancing and router z-losses (each a mean
    over its MoE layers, weighted by the model config) to the objective, counted once per
    token so that they average over microbatches like the loss; their values, the dropped
    share, the busiest expert's load and every expert's share of the assignments
    (moe_load_<e>, the load histogram) are logged as moe_* means. With LoRA the base
    parameters sit behind stop_gradient: only the adapters' gradients are computed (and
    make grad_norm). `loss_chunk` > 0 computes the loss without the whole logits (see
    `_loss_sums`).
    """
    m = getattr(model, "cfg", None)
    aux_w, z_w = getattr(m, "moe_aux_loss_weight", 0.0), getattr(m, "moe_z_loss_weight", 0.0)
    lora = getattr(m, "lora_rank", 0) > 0

    def loss_fn(params, batch, rng):
        params = freeze_base(params) if lora else params
        ce_sum, z_sum, n, moe = _loss_sums(model, params, batch, rng, True, loss_chunk)
        total = ce_sum + z_loss * z_sum
        if moe:
            total = total + n * (aux_w * moe["moe_aux_loss"] + z_w * moe["moe_z_loss"])
        return total, {"loss": ce_sum, "tokens": n, **{k: v * n for k, v in moe.items()}}

    means = metric_names(m.moe_experts) if getattr(m, "moe_experts", 0) else ()
    return make_step(
        loss_fn,
        tx,
        microbatches=microbatches,
        dropout=dropout,
        schedule=schedule,
        token_means=means,
    )


def train_step_for(
    cfg: RunConfig, model: nn.Module, tx: optax.GradientTransformation, total_steps: int = 0
) -> StepFn:
    """The pure train step `cfg` describes: its microbatches, z-loss, dropout, lr schedule
    (over `total_steps`, default train.steps) and loss chunking."""
    t = cfg.train
    return make_train_step(
        model,
        tx,
        microbatches=t.microbatches,
        z_loss=t.z_loss,
        dropout=cfg.model.dropout > 0,
        schedule=lr_schedule(cfg.optimizer, total_steps or t.steps),
        loss_chunk=t.loss_chunk,
    )


def make_eval_step(
    model: nn.Module, loss_chunk: int = 0
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Summed loss and token count of one batch (the loop divides after summing batches)."""

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        ce_sum, _, n, _ = _loss_sums(model, params, batch, None, loss_chunk=loss_chunk)
        return {"loss_sum": ce_sum, "tokens": n}

    return eval_step


def jit_train_step(step_fn, state_shardings: TrainState, mesh: Mesh):
    """Compile once with explicit shardings; the old state's buffers are donated."""
    rules_step = _with_rules(step_fn, mesh)
    return jax.jit(
        rules_step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(eval_fn, params_shardings: Any, mesh: Mesh):
    """Compile the eval step with the same parameter layout as training."""
    return jax.jit(
        _with_rules(eval_fn, mesh),
        in_shardings=(params_shardings, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )


def _with_rules(fn, mesh: Mesh):
    """Trace `fn` inside the mesh and logical-axis rules so activation constraints bind."""

    def wrapped(*args):
        with mesh_context(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return fn(*args)

    return wrapped
