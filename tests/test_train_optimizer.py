"""Tests of the optimizer: which parameters decay, per-group learning-rate scales (0 freezes),
and the warmup-cosine schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TRANSFORMERS, assert_trees_close, init_params, train_step_model

from jaxlm.config import OptimizerConfig
from jaxlm.train.optimizer import decay_mask, lr_schedule, make_optimizer

S = 16  # train_step_model's sequence length


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_decay_mask_marks_matrices_only(family):
    params = init_params(train_step_model(family), S, eager=True)
    mask = decay_mask(params)
    names = {}
    for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
        name = path[-1].key
        names[name] = names.get(name, 0) + 1
        expected = name in ("kernel", "embedding")
        assert decays == expected, f"{jax.tree_util.keystr(path)}: decay={decays}"
    assert names.get("kernel") and names.get("embedding") and names.get("scale")
    if train_step_model(family).bias:
        assert names.get("bias")


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_weight_decay_spares_norms_and_biases(family):
    """With zero gradients the AdamW update is pure decay: nonzero only on matrices."""
    params = init_params(train_step_model(family), S, eager=True)
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
    body = init_params(train_step_model("llama"), S, eager=True)
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
