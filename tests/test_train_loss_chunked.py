"""The chunked cross-entropy (train.loss_chunk): same loss and gradients as the whole logits,
the same train step (microbatches, remat, scan_layers, sharded meshes), and far less memory.

The sharded check runs in a subprocess with 8 CPU devices (this file run as a script).
"""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    FAST_XLA,
    assert_one_sentence,
    assert_trees_close,
    fake_devices_env,
    init_params,
    padded_batch,
    resolved_model,
    tiny_run_config,
)

from jaxlm.config import MeshConfig, ModelConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.models.lm import head_logits, head_weight
from jaxlm.parallel.sharding import make_mesh, put_batch
from jaxlm.train.loss import chunked_cross_entropy_sums, cross_entropy_sums
from jaxlm.train.state import TrainState, init_train_state
from jaxlm.train.step import _loss_sums, jit_train_step, make_train_step

S, V = 16, 64
LENGTHS = (16, 11, 5, 1)  # padded rows: weights and segment ids of 0 at the end
Z = 1e-2  # z-loss weight
LOSS_KEYS = ("inputs", "targets", "positions", "segment_ids")  # the int32 parts of a batch


def _model(family: str, **fields) -> ModelConfig:
    return resolved_model(
        family, vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=S, init_std=0.3,
        **fields,
    )  # fmt: skip


def _batch(seed: int = 0, lengths=LENGTHS) -> dict[str, jax.Array]:
    return jax.tree.map(jnp.asarray, padded_batch(np.random.default_rng(seed), lengths, S, V))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _objective_and_grads(model, params, batch, chunk):
    """The train objective (mean CE + z-loss), its parts, and the gradients of all params."""

    def objective(p):
        ce, z, n, _ = _loss_sums(model, p, batch, None, loss_chunk=chunk)
        return (ce + Z * z) / n, (ce, z, n)

    return jax.value_and_grad(objective, has_aux=True)(params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_loss_and_gradients_equal_the_whole_logits(family):
    cfg = _model(family)
    assert cfg.tie_embeddings == (family == "gpt2")  # both kinds of head
    model, params, batch = build_model(cfg), init_params(cfg, S), _batch()
    (ref, ref_parts), ref_grads = _objective_and_grads(model, params, batch, 0)
    for chunk in (5, 8):  # 5 does not divide S (padded with weight-0 tokens)
        (obj, parts), grads = _objective_and_grads(model, params, batch, chunk)
        np.testing.assert_allclose(obj, ref, rtol=1e-6)
        np.testing.assert_allclose(parts, ref_parts, rtol=1e-6)
        assert_trees_close(grads, ref_grads, atol=1e-5)


def test_head_logits_is_the_models_head():
    """The pure head applied to the hidden states gives exactly the model's logits."""
    for family in ("gpt2", "llama"):
        cfg = _model(family)
        model, params, tokens = build_model(cfg), init_params(cfg, S), _batch()["inputs"]
        apply = jax.jit(model.apply, static_argnames="return_hidden")
        logits = apply({"params": params}, tokens)
        hidden = apply({"params": params}, tokens, return_hidden=True)
        np.testing.assert_array_equal(head_logits(cfg, head_weight(cfg, params), hidden), logits)


def _state(params, tx) -> TrainState:
    rng = jax.random.PRNGKey(1)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng)


@pytest.mark.parametrize(
    "fields, microbatches",
    [({}, 1), ({"remat": "full", "scan_layers": True}, 2)],
    ids=["plain", "remat-scan-microbatches"],
)
def test_train_step_with_loss_chunk_equals_without(fields, microbatches):
    cfg = _model("llama", **fields)
    model, tx = build_model(cfg), optax.sgd(1.0)  # the update is the gradient itself
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, S), jnp.int32)))
    state, batch = _state(params["params"], tx), _batch(lengths=(16, 3, 9, 16))
    kw = {"microbatches": microbatches, "z_loss": Z}
    ref, m_ref = jax.jit(make_train_step(model, tx, **kw))(state, batch)
    new, m_new = jax.jit(make_train_step(model, tx, loss_chunk=6, **kw))(state, batch)
    np.testing.assert_allclose(m_new["loss"], m_ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_new["grad_norm"], m_ref["grad_norm"], rtol=1e-5)
    assert_trees_close(new.params, ref.params, atol=1e-5)


def test_loss_chunk_config_is_validated_and_reaches_the_step():
    assert tiny_run_config().train.loss_chunk == 0
    assert tiny_run_config(loss_chunk=4).train.loss_chunk == 4
    for overrides, key in (
        (["train.loss_chunk=-1"], "train.loss_chunk=-1"),
        (["mesh.data=1", "mesh.sequence=2", "data.seq_len=256", "train.loss_chunk=3"], "2"),
        (["mesh.data=1", "mesh.sequence=2", "data.seq_len=256", "train.loss_chunk=96"], "256"),
    ):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert key in str(info.value) and "train.loss_chunk" in str(info.value)
        assert_one_sentence(str(info.value))
    ok = ["mesh.data=1", "mesh.sequence=2", "data.seq_len=256", "train.loss_chunk=64"]
    assert load_config(None, ok).train.loss_chunk == 64


# --- memory ----------------------------------------------------------------------------------


def _loss_temp_bytes(b: int, s: int, v: int, d: int, tied: bool, chunk: int) -> int:
    """XLA's temporary bytes of the compiled loss + gradient (head weight and hidden states)
    at abstract shapes: nothing is allocated."""
    cfg = ModelConfig(vocab_size=v, d_model=d, n_heads=1, tie_embeddings=tied)
    head = functools.partial(head_logits, cfg)

    def loss(w, h_BxSxD, t_BxS, w_BxS):
        if chunk:
            ce, z, n = chunked_cross_entropy_sums(h_BxSxD, head, w, t_BxS, w_BxS, chunk)
        else:
            ce, z, n = cross_entropy_sums(head(w, h_BxSxD), t_BxS, w_BxS)
        return (ce + Z * z) / n

    args = (
        jax.ShapeDtypeStruct((v, d) if tied else (d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, s, d), jnp.float32),
        jax.ShapeDtypeStruct((b, s), jnp.int32),
        jax.ShapeDtypeStruct((b, s), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_memory_is_a_fraction_of_the_whole_logits(tied):
    """B=1, S=8192, V=131072 (the whole f32 logits are 4 GiB), D=64, chunks of 1024 tokens
    (one chunk's f32 logits: 512 MiB). Compiles in about a second each on 2 CPU cores."""
    plain = _loss_temp_bytes(1, 8192, 131072, 64, tied, 0)
    chunked = _loss_temp_bytes(1, 8192, 131072, 64, tied, 1024)
    print(f"temp MiB: whole logits {plain / 2**20:.1f}, chunks of 1024 {chunked / 2**20:.1f}")
    assert plain >= 8192 * 131072 * 4  # at least the f32 logits
    assert chunked <= plain / 4
    assert chunked <= 4 * 1024 * 131072 * 4  # a few chunk-sized buffers


def test_chunked_train_loss_memory_through_the_model():
    """The model's own path: the gradient of `_loss_sums` never holds the whole logits."""
    cfg = resolved_model("llama", vocab_size=32768, d_model=32, n_layers=1, n_heads=2)
    model = build_model(cfg)
    init = functools.partial(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(jax.eval_shape(init))["params"]
    batch = {k: jax.ShapeDtypeStruct((1, 1024), jnp.int32) for k in LOSS_KEYS}
    batch["weights"] = jax.ShapeDtypeStruct((1, 1024), jnp.float32)

    def temp(chunk):
        grad = jax.grad(lambda p, b: _loss_sums(model, p, b, None, loss_chunk=chunk)[0])
        return jax.jit(grad).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp(0), temp(128)
    print(f"temp MiB: whole logits {plain / 2**20:.1f}, chunks of 128 {chunked / 2**20:.1f}")
    assert chunked <= plain / 4


# --- sharded -----------------------------------------------------------------------------------

MESHES = {"fsdp-tensor-sequence": (1, 2, 2, 2)}  # every axis the head and the loss use


def worker() -> dict:
    """One sgd step with and without loss_chunk on each mesh (jit_train_step's shardings)."""
    assert len(jax.devices()) == 8
    out = {}
    for name, (data, fsdp, tensor, seq) in MESHES.items():
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor, sequence=seq))
        for family in ("gpt2", "llama"):
            model, tx = build_model(_model(family)), optax.sgd(1.0)
            state, shardings = init_train_state(model, tx, S, 0, mesh)
            batch = put_batch(jax.device_get(_batch(lengths=(16, 3, 9, 16))), mesh)
            res = []
            for chunk in (0, 4):  # 4: a multiple of the sequence shards that divides S
                step = make_train_step(model, tx, microbatches=2, z_loss=Z, loss_chunk=chunk)
                new, metrics = jit_train_step(step, shardings, mesh)(state, batch)
                res.append((float(metrics["loss"]), jax.device_get(new.params)))
                state, _ = init_train_state(model, tx, S, 0, mesh)  # the old one was donated
            diff = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(*(jax.tree.leaves(r[1]) for r in res), strict=True)
            )
            out[f"{name}/{family}"] = {"losses": [res[0][0], res[1][0]], "param_diff": diff}
    return out


def test_sharded_train_step_with_loss_chunk_equals_without():
    env = fake_devices_env(8, FAST_XLA)
    p = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    print(results)
    assert len(results) == 2 * len(MESHES)
    for name, r in results.items():
        np.testing.assert_allclose(r["losses"][1], r["losses"][0], rtol=1e-6, err_msg=name)
        assert r["param_diff"] <= 1e-5, (name, r)


if __name__ == "__main__":
    print(json.dumps(worker()))
