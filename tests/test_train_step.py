"""Tests of the train step: accumulation, masking, z-loss, matmul precision, learning."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    TRANSFORMERS,
    assert_trees_close,
    init_params,
    loaded_model,
    padded_batch,
    train_step_model,
)

from jaxlm.config import MeshConfig, ModelConfig, OptimizerConfig
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh
from jaxlm.train.optimizer import lr_schedule, make_optimizer
from jaxlm.train.state import TrainState, init_train_state
from jaxlm.train.step import _loss_sums, jit_train_step, make_train_step

S, V = 16, 64  # train_step_model's sequence length and vocabulary
# Real tokens per row: every row differs, so token weighting across microbatches matters.
LENGTHS = (16, 3, 9, 16, 1, 12, 7, 14)


def make_batch(seed: int = 0, lengths=LENGTHS) -> dict[str, np.ndarray]:
    """Rows of real tokens followed by padding (segment 0, weight 0)."""
    return padded_batch(np.random.default_rng(seed), lengths, S, V)


def fresh_state(cfg: ModelConfig, tx) -> TrainState:
    params = init_params(cfg, S, eager=True)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(1),
    )


@functools.partial(jax.jit, static_argnums=0)
def _token_ce(model, params, batch):
    logits = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])


def plain_ce(model, params, batch, rows=slice(None)) -> float:
    """Token-weighted mean cross-entropy of `rows`, independent of jaxlm.train.loss."""
    ce_BxS = np.asarray(_token_ce(model, params, batch))[rows]
    w_BxS = batch["weights"][rows]
    return float((ce_BxS * w_BxS).sum() / w_BxS.sum())


# --- gradient accumulation -------------------------------------------------------------------


def test_microbatches_equal_one_big_batch():
    cfg = train_step_model("llama")
    model = build_model(cfg)
    tx = optax.sgd(1.0)  # updates are the gradients themselves, so params compare grads
    batch = make_batch()
    state = fresh_state(cfg, tx)
    one, m_one = jax.jit(make_train_step(model, tx, microbatches=1))(state, batch)
    four, m_four = jax.jit(make_train_step(model, tx, microbatches=4))(state, batch)

    np.testing.assert_allclose(m_four["loss"], m_one["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_four["grad_norm"], m_one["grad_norm"], rtol=1e-5)
    assert float(m_one["tokens"]) == float(m_four["tokens"]) == sum(LENGTHS)
    # The same sums in another order: float32 differences reach ~1.3e-6 on gradients of up
    # to ~0.3 (the first block and the embedding, at the end of the backward chain).
    assert_trees_close(four.params, one.params, atol=5e-6)
    assert int(four.step) == int(one.step) == 1
    np.testing.assert_allclose(m_one["loss"], plain_ce(model, state.params, batch), rtol=1e-5)

    # The batch is one where averaging per-microbatch means would be wrong (rows i::4).
    per_micro = [plain_ce(model, state.params, batch, slice(i, None, 4)) for i in range(4)]
    assert abs(np.mean(per_micro) - float(m_one["loss"])) > 1e-3
    moved = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params), strict=True)
    )
    assert moved > 1e-4


# --- loss masking and z-loss -----------------------------------------------------------------


def test_targets_under_zero_weight_are_ignored():
    cfg = train_step_model("llama")
    model = build_model(cfg)
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(model, tx))
    state = fresh_state(cfg, tx)
    batch = make_batch(seed=3)
    pad = batch["weights"] == 0
    assert pad.any()

    other = {**batch, "targets": np.where(pad, (batch["targets"] + 5) % V, batch["targets"])}
    new_a, m_a = step(state, batch)
    new_b, m_b = step(state, other)
    np.testing.assert_array_equal(m_a["loss"], m_b["loss"])
    np.testing.assert_array_equal(m_a["grad_norm"], m_b["grad_norm"])
    assert_trees_close(new_a.params, new_b.params, atol=0)

    # ... while a target under weight 1 does count.
    real = {**batch, "targets": batch["targets"].copy()}
    real["targets"][0, 0] = (real["targets"][0, 0] + 1) % V
    _, m_c = step(state, real)
    assert float(m_c["loss"]) != float(m_a["loss"])


def test_z_loss_changes_gradient_not_reported_loss():
    cfg = train_step_model("llama")
    model = build_model(cfg)
    tx = optax.sgd(1.0)
    z = 0.5
    batch = make_batch(seed=4)
    state = fresh_state(cfg, tx)
    new0, m0 = jax.jit(make_train_step(model, tx))(state, batch)
    new_z, m_z = jax.jit(make_train_step(model, tx, z_loss=z))(state, batch)

    np.testing.assert_allclose(m_z["loss"], m0["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_z["loss"], plain_ce(model, state.params, batch), rtol=1e-5)
    assert abs(float(m_z["grad_norm"]) - float(m0["grad_norm"])) > 1e-4

    # With sgd(1) the update is -grad; the difference is exactly the z-loss term's gradient.
    def z_term(params):
        logits = model.apply(
            {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
        )
        log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
        w = batch["weights"]
        return z * jnp.sum(jnp.square(log_z) * w) / jnp.sum(w)

    expected = jax.jit(jax.grad(z_term))(state.params)
    got = jax.tree.map(lambda a, b: a - b, new0.params, new_z.params)
    assert_trees_close(got, expected, atol=2e-6)


# --- matmul precision ----------------------------------------------------------------------


def test_matmul_precision_reaches_every_dot():
    cfg = loaded_model("llama", "model.d_model=32", "model.vocab_size=300", "model.n_layers=1")
    cfg = dataclasses.replace(cfg, matmul_precision="highest")
    model = build_model(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    batch = {
        "inputs": tokens,
        "targets": tokens,
        "positions": jnp.zeros((1, 8), jnp.int32),
        "segment_ids": jnp.ones((1, 8), jnp.int32),
        "weights": jnp.ones((1, 8)),
    }
    text = str(jax.make_jaxpr(jax.grad(lambda p: _loss_sums(model, p, batch, None)[0]))(params))
    dots = text.count("dot_general[")
    assert dots > 0 and text.count("HIGHEST") >= dots


# --- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_loss_decreases_on_a_fixed_batch(family):
    """The real path: sharded init, jitted donated step, schedule reported per step."""
    steps = 15
    model = build_model(train_step_model(family))
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1)
    tx = make_optimizer(opt_cfg, steps)
    mesh = make_mesh(MeshConfig())
    state, shardings = init_train_state(model, tx, S, seed=0, mesh=mesh)
    schedule = lr_schedule(opt_cfg, steps)
    step = jit_train_step(make_train_step(model, tx, schedule=schedule), shardings, mesh)
    batch = make_batch(seed=5)
    losses, lrs = [], []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
    assert int(state.step) == steps
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1.0, losses
    np.testing.assert_allclose(lrs, [float(schedule(i)) for i in range(steps)], rtol=1e-6)
