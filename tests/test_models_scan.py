"""jaxlm.models.scan, the Transformer's speed knobs: every named remat policy and scanned
layers give the loss and gradients of the plain model; the scanned parameter layout."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, loaded_model, next_token_loss

from jaxlm.models import build_model
from jaxlm.models.scan import SCANNED, stack_blocks, unstack_blocks

B = 2


def _loss_and_grads(cfg, params, tokens):
    return jax.jit(jax.value_and_grad(next_token_loss(build_model(cfg))))(params, tokens)


@pytest.fixture(scope="module")
def plain():
    """A tiny Llama model's params, loss and gradients without any speed knob."""
    cfg = loaded_model("llama", "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, 16), 0, 300)
    params = nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    return cfg, params, tokens, _loss_and_grads(cfg, params, tokens)


@pytest.mark.parametrize(
    "policy",
    [
        "full",
        pytest.param("dots_saveable", marks=pytest.mark.slow),
        pytest.param("dots_with_no_batch_dims_saveable", marks=pytest.mark.slow),
        "save_attention_output",
        "save_qkv_attention",
    ],
)
def test_remat_gives_the_same_loss_and_gradients(plain, policy):
    cfg, params, tokens, (loss, grads) = plain
    remat_cfg = dataclasses.replace(cfg, remat=policy)
    loss_r, grads_r = _loss_and_grads(remat_cfg, params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    assert_trees_close(grads_r, grads, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("family,remat", [("llama", "none"), ("gpt2", "none"), ("llama", "full")])
def test_scan_layers_gives_the_same_loss_and_gradients(family, remat):
    cfg = loaded_model(family, "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, 16), 0, 300)
    params = nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    loss, grads = _loss_and_grads(cfg, params, tokens)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    loss_s, grads_s = _loss_and_grads(scan_cfg, stack_blocks(params, 3), tokens)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    assert_trees_close(unstack_blocks(grads_s, 3), grads, atol=2e-6, rtol=2e-5)


def test_scanned_params_layout_and_round_trip():
    """A scanned model's params are the stacked blocks, with `layers` as the leading axis."""
    cfg = loaded_model("gpt2", "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
    scan_cfg = dataclasses.replace(cfg, scan_layers=True)
    tokens = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(build_model(scan_cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    plain = nn.unbox(jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), tokens)["params"])
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)  # noqa: E731
    assert shapes(nn.unbox(boxed)) == shapes(jax.eval_shape(lambda p: stack_blocks(p, 3), plain))
    kernel = boxed[SCANNED]["attn"]["query"]["kernel"]
    assert kernel.names == ("layers", "embed", "heads", "head_dim")
    real = {"block_0": {"w": jnp.ones(2)}, "block_1": {"w": 2 * jnp.ones(2)}, "embed": jnp.ones(3)}
    back = unstack_blocks(stack_blocks(real, 2), 2)
    assert jax.tree.structure(back) == jax.tree.structure(real)
    assert_trees_close(back, real, atol=2e-6, rtol=2e-5)
