"""jaxlm.models.layers: the fused q/k/v (gate/up) matmul and its hand-written backward."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import assert_trees_close

from jaxlm.models.layers import stacked_dense


def test_stacked_dense_matches_separate_matmuls():
    """The fused q/k/v (gate/up) matmul and its hand-written backward equal plain autodiff."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (2, 5, 8))
    ks = [jax.random.normal(k, (8, 3, 4)) for k in keys[1:]]
    bias = jnp.arange(12.0).reshape(3, 4)
    probe = [jnp.cos(jnp.arange(2 * 5 * 12.0)).reshape(2, 5, 3, 4) * (i + 1) for i in range(3)]

    def fused(x, *ks):
        ys = stacked_dense(x, list(ks), [bias, None, None], jnp.float32)
        return sum(jnp.sum(y * p) for y, p in zip(ys, probe, strict=True))

    def plain(x, *ks):
        ys = [jnp.einsum("bsd,dhe->bshe", x, k) for k in ks]
        ys[0] = ys[0] + bias
        return sum(jnp.sum(y * p) for y, p in zip(ys, probe, strict=True))

    args = (x, *ks)
    np.testing.assert_allclose(fused(*args), plain(*args), rtol=1e-5)
    assert_trees_close(
        jax.grad(fused, argnums=(0, 1, 2, 3))(*args),
        jax.grad(plain, argnums=(0, 1, 2, 3))(*args),
        atol=2e-6,
        rtol=2e-5,
    )
