"""Tests of the train step: accumulation, masking, z-loss, weight decay, schedule, learning."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.config import MeshConfig, ModelConfig, OptimizerConfig, RunConfig, resolve
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh
from jaxlm.train.optimizer import decay_mask, lr_schedule, make_optimizer
from jaxlm.train.state import TrainState, init_train_state
from jaxlm.train.step import jit_train_step, make_train_step

S, V = 16, 64
FAMILIES = ("gpt2", "llama")
# Real tokens per row: every row differs, so token weighting across microbatches matters.
LENGTHS = (16, 3, 9, 16, 1, 12, 7, 14)


def tiny_cfg(family: str) -> ModelConfig:
    # A wide init makes per-token losses differ, so a wrong token weighting would show.
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=S, init_std=0.3)
    if family == "llama":
        kw["n_kv_heads"] = 2
    return resolve(RunConfig(model=ModelConfig(family=family, **kw))).model


def make_batch(seed: int = 0, lengths=LENGTHS) -> dict[str, np.ndarray]:
    """Rows of real tokens followed by padding (segment 0, weight 0)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    real_BxS = np.arange(S)[None, :] < np.asarray(lengths)[:, None]
    return {
        "inputs": rng.integers(0, V, (b, S)).astype(np.int32),
        "targets": rng.integers(0, V, (b, S)).astype(np.int32),
        "segment_ids": real_BxS.astype(np.int32),
        "positions": np.broadcast_to(np.arange(S, dtype=np.int32), (b, S)).copy(),
        "weights": real_BxS.astype(np.float32),
    }


@functools.cache
def init_params(cfg: ModelConfig):
    """Unboxed parameters of a config, made once per test process."""
    model = build_model(cfg)
    return nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, S), jnp.int32))["params"])


def fresh_state(cfg: ModelConfig, tx) -> TrainState:
    params = init_params(cfg)
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


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


# --- gradient accumulation -------------------------------------------------------------------


def test_microbatches_equal_one_big_batch():
    cfg = tiny_cfg("llama")
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
    cfg = tiny_cfg("llama")
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
    cfg = tiny_cfg("llama")
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


# --- optimizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_mask_marks_matrices_only(family):
    params = init_params(tiny_cfg(family))
    mask = decay_mask(params)
    names = {}
    for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
        name = path[-1].key
        names[name] = names.get(name, 0) + 1
        expected = name in ("kernel", "embedding")
        assert decays == expected, f"{jax.tree_util.keystr(path)}: decay={decays}"
    assert names.get("kernel") and names.get("embedding") and names.get("scale")
    if tiny_cfg(family).bias:
        assert names.get("bias")


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_decay_spares_norms_and_biases(family):
    """With zero gradients the AdamW update is pure decay: nonzero only on matrices."""
    params = init_params(tiny_cfg(family))
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones_like(p) if path[-1].key == "bias" else p, params
    )
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
    tx = make_optimizer(cfg, total_steps=10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        decayed = bool(jnp.any(u != 0))
        assert decayed == (path[-1].key in ("kernel", "embedding")), jax.tree_util.keystr(path)


def test_lr_scale_scales_a_group_and_zero_freezes_it():
    """Per-group AdamW: a group at scale s moves s times as far; at 0 it keeps no state."""
    body = init_params(tiny_cfg("llama"))
    params = {"body": body, "head": {"kernel": jnp.ones((32, 3)), "bias": jnp.ones((3,))}}
    keys = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(params))))
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
    cfg = OptimizerConfig(lr=0.1, warmup_steps=0, weight_decay=0.5)

    def updates(tx):
        state = tx.init(params)
        return tx.update(grads, state, params)[0], state

    plain, _ = updates(make_optimizer(cfg, total_steps=10))
    scaled, _ = updates(make_optimizer(cfg, 10, lr_scale={"body": 0.25, "head": 1.0}))
    assert_trees_close(scaled["head"], plain["head"], atol=0)
    assert_trees_close(scaled["body"], jax.tree.map(lambda u: 0.25 * u, plain["body"]), atol=1e-9)

    frozen, state = updates(make_optimizer(cfg, 10, lr_scale={"body": 0.0, "head": 1.0}))
    assert all(not jnp.any(u) for u in jax.tree.leaves(frozen["body"]))
    assert_trees_close(frozen["head"], plain["head"], atol=0)
    head_size = sum(x.size for x in jax.tree.leaves(params["head"]))
    # Adam's two moments of the head and a few step counters; nothing of the body.
    assert sum(x.size for x in jax.tree.leaves(state)) < 2 * head_size + 8


def test_lr_schedule_warmup_peak_and_floor():
    cfg = OptimizerConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    sched = lr_schedule(cfg, total_steps=50)
    lrs = np.array([float(sched(i)) for i in range(61)])
    np.testing.assert_allclose(lrs[0], cfg.lr / (cfg.warmup_steps + 1), rtol=1e-6)  # no wasted step
    np.testing.assert_allclose(lrs[10], cfg.lr, rtol=1e-6)
    np.testing.assert_allclose(lrs[50], cfg.lr * cfg.min_lr_ratio, rtol=1e-5)
    np.testing.assert_allclose(lrs[50:], cfg.lr * cfg.min_lr_ratio, rtol=1e-5)
    assert np.all(np.diff(lrs[:11]) > 0)
    assert np.all(np.diff(lrs[10:51]) < 0)
    assert lrs.max() == pytest.approx(cfg.lr)


# --- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_decreases_on_a_fixed_batch(family):
    """The real path: sharded init, jitted donated step, schedule reported per step."""
    steps = 15
    model = build_model(tiny_cfg(family))
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
