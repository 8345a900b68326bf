"""The train state and its sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxlm.parallel.sharding import logical_sharding


class TrainState(struct.PyTreeNode):
    """Everything that changes during training (the model and optimizer are static)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data: dropout keys are fold_in(rng, step)


def new_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """The step-0 state around `params`: fresh optimizer state; dropout keys derive from `rng`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int):
    def init(rng: jax.Array) -> TrainState:
        params_rng, dropout_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, seq_len), jnp.int32)
        params = model.init(params_rng, tokens)["params"]
        return new_train_state(params, tx, dropout_rng)

    return init


def state_shardings(
    model: nn.Module, tx: optax.GradientTransformation, seq_len: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """(abstract unboxed state, its NamedShardings) without allocating anything."""
    boxed = jax.eval_shape(_init_fn(model, tx, seq_len), jax.random.PRNGKey(0))
    shardings = logical_sharding(boxed, mesh)
    return nn.unbox(boxed), shardings


def init_train_state(
    model: nn.Module, tx: optax.GradientTransformation, seq_len: int, seed: int, mesh: Mesh
) -> tuple[TrainState, TrainState]:
    """Initialise the state directly into its shardings; returns (state, shardings)."""
    _, shardings = state_shardings(model, tx, seq_len, mesh)
    init = _init_fn(model, tx, seq_len)
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
