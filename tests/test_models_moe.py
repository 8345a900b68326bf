"""Mixture of experts (jaxlm.models.moe): the sorted, grouped-matmul layer against a per-token
reference, token dropping under a capacity, the router's losses, gradients, FLOPs, config
refusals, a short training run, and expert-sharded == unsharded on 8 fake devices (a
subprocess: this file run as a script)."""

from __future__ import annotations

import json
import math
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
    TINY_MODEL,
    assert_one_sentence,
    fake_devices_env,
    padded_batch,
    random_tokens,
    resolved_model,
)

from jaxlm import cli
from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.models.moe import (
    MOE,
    ExpertWeights,
    MoeMlp,
    load_keys,
    moe_apply,
    moe_metrics,
    route,
)
from jaxlm.perf.flops import active_param_count, flops_per_token, param_count
from jaxlm.train.state import TrainState
from jaxlm.train.step import make_train_step

T, D, F, X = 24, 8, 12, 4


def weights(kind: str, bias: bool, seed: int = 0) -> ExpertWeights:
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    n = lambda k, shape: 0.3 * jax.random.normal(k, shape)  # noqa: E731
    return ExpertWeights(
        n(ks[0], (X, D, F)) if kind == "swiglu" else None,
        n(ks[1], (X, D, F)),
        n(ks[2], (X, F, D)),
        n(ks[3], (X, F)) if bias else None,
        n(ks[4], (X, D)) if bias else None,
    )


def skewed_logits(seed: int = 1) -> jax.Array:
    """Random router logits with uneven loads: expert 0 favoured, expert 3 never chosen."""
    logits = jax.random.normal(jax.random.PRNGKey(seed), (T, X))
    return logits + jnp.asarray([1.0, 0.0, 0.0, -30.0])


def per_token_reference(x_TxD, logits_TxX, w: ExpertWeights, kind: str, k: int, router: str):
    """Each token through its own top-k experts, one token at a time (weights gathered)."""
    logits_TxX = logits_TxX.astype(jnp.float32)
    if router == "sigmoid":
        scores = jax.nn.sigmoid(logits_TxX)
    else:
        scores = jax.nn.softmax(logits_TxX)
    rows = []
    for t in range(x_TxD.shape[0]):
        gates, experts = jax.lax.top_k(scores[t], k)
        gates = gates / jnp.sum(gates) if k > 1 else gates
        y = jnp.zeros(x_TxD.shape[1])
        for g, e in zip(gates, experts, strict=True):
            up = x_TxD[t] @ w.up_XxDxF[e] + (0 if w.up_bias_XxF is None else w.up_bias_XxF[e])
            if kind == "swiglu":
                h = nn.silu(x_TxD[t] @ w.gate_XxDxF[e]) * up
            else:
                h = nn.gelu(up)
            out = h @ w.down_XxFxD[e]
            y = y + g * (out + (0 if w.down_bias_XxD is None else w.down_bias_XxD[e]))
        rows.append(y)
    return jnp.stack(rows)


@pytest.mark.parametrize(
    "kind, bias, k, router",
    [
        pytest.param("swiglu", False, 2, "softmax", marks=pytest.mark.slow),  # ~30 s of compile
        pytest.param("gelu", True, 1, "softmax", marks=pytest.mark.slow),
        ("gelu", False, 2, "sigmoid"),
    ],
)
def test_dropless_matches_per_token_reference_with_gradients(kind, bias, k, router):
    x_TxD = jax.random.normal(jax.random.PRNGKey(2), (T, D))
    logits, w = skewed_logits(), weights(kind, bias)
    cot_TxD = jax.random.normal(jax.random.PRNGKey(3), (T, D))

    def moe(x, logits, w):
        return moe_apply(x, route(logits, k, router), w, kind, k)[0]

    def ref(x, logits, w):
        return per_token_reference(x, logits, w, kind, k, router)

    routing = route(logits, k, router)
    loads = np.bincount(np.asarray(routing.expert_A), minlength=X)
    assert loads[3] == 0 and len(set(loads[:3])) > 1  # uneven, one expert idle
    np.testing.assert_allclose(moe(x_TxD, logits, w), ref(x_TxD, logits, w), atol=1e-5)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cot_TxD), argnums=(0, 1, 2)))  # noqa: E731
    got, want = grad(moe)(x_TxD, logits, w), grad(ref)(x_TxD, logits, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.max(jnp.abs(got[1]))) > 0  # the router's logits get a gradient


def test_capacity_keeps_the_first_assignments_of_each_expert_and_drops_the_rest():
    x_TxD = jax.random.normal(jax.random.PRNGKey(2), (T, D))
    w = weights("swiglu", False)
    # Every token ranks expert 0 first and expert 1 second: first choices fill expert 0.
    logits = jnp.tile(jnp.asarray([3.0, 2.0, 0.0, -1.0]), (T, 1))
    logits = logits + 0.01 * jax.random.normal(jax.random.PRNGKey(4), (T, X))
    c = math.ceil(1.0 * T * 2 / X)  # capacity factor 1, top-2: 12 rows per expert
    out, dropped = moe_apply(x_TxD, route(logits, 2), w, "swiglu", 2, capacity_factor=1.0)
    assert float(dropped) == pytest.approx(1 - 2 * c / (2 * T))  # experts 2, 3 stay empty
    # Tokens 0..c-1 kept both experts; the rest kept none (expert 1's rows went to the
    # first c second choices too), so their output is exactly zero.
    full, _ = moe_apply(x_TxD, route(logits, 2), w, "swiglu", 2)
    np.testing.assert_allclose(out[:c], full[:c], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[c:]), 0.0)
    # A generous capacity drops nothing and equals the dropless layer.
    out2, dropped2 = moe_apply(x_TxD, route(logits, 2), w, "swiglu", 2, capacity_factor=2.0)
    assert float(dropped2) == 0.0
    np.testing.assert_allclose(out2, full, atol=1e-6)


def test_router_losses_have_their_known_values():
    uniform = route(jnp.zeros((T, X)), 2)
    assert float(uniform.aux_loss) == pytest.approx(1.0)
    assert float(uniform.z_loss) == pytest.approx(math.log(X) ** 2)
    # Two experts, every token prefers expert 0 with probability p: aux = 2 * 1 * p.
    a = 1.5
    p = math.exp(a) / (math.exp(a) + 1)
    skew = route(jnp.tile(jnp.asarray([a, 0.0]), (T, 1)), 1)
    assert float(skew.aux_loss) == pytest.approx(2 * p, rel=1e-6)
    assert float(skew.z_loss) == pytest.approx(math.log(math.exp(a) + 1) ** 2, rel=1e-6)
    np.testing.assert_allclose(skew.gate_A, p, rtol=1e-6)  # top-1 gates are not renormalised


def moe_cfg(family="llama", **kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, init_std=0.1)
    moe = dict(moe_experts=4, moe_top_k=2, moe_d_ff=16)
    return resolved_model(family, **{**base, **moe, **kw})


@pytest.mark.parametrize("family", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_gradients_reach_router_experts_and_shared_experts(family):
    cfg = moe_cfg(family, moe_shared_experts=1, moe_every=2)
    model = build_model(cfg)
    tokens = jnp.asarray(random_tokens(0, (2, 16), 64))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    assert "mlp" in params["block_0"] and "moe" in params["block_1"]  # moe_every=2

    def losses(p):
        logits, state = model.apply({"params": p}, tokens, mutable=[MOE])
        stats = moe_metrics(state[MOE])
        return jnp.mean(jax.nn.logsumexp(logits, -1)), stats["moe_aux_loss"]

    moe_of = lambda g: g["block_1"]["moe"]  # noqa: E731
    g_lm = moe_of(jax.jit(jax.grad(lambda p: losses(p)[0]))(params))
    g_aux = moe_of(jax.jit(jax.grad(lambda p: losses(p)[1]))(params))
    for name in ("router", "up", "down", "shared"):
        for leaf in jax.tree.leaves(g_lm[name]):
            assert float(jnp.max(jnp.abs(leaf))) > 0, name
    per_expert = jnp.max(jnp.abs(g_lm["down"]), axis=(1, 2))
    assert int(jnp.sum(per_expert > 0)) >= 2  # several experts received tokens
    assert float(jnp.max(jnp.abs(g_aux["router"]))) > 0  # the balance loss trains the router
    assert float(jnp.max(jnp.abs(g_aux["up"]))) == 0.0  # ...and only the router


def test_load_histogram_is_each_experts_share_of_the_assignments():
    cfg = moe_cfg(moe_top_k=2)
    layer = MoeMlp(cfg)
    x_BxSxD = jax.random.normal(jax.random.PRNGKey(3), (2, 12, cfg.d_model))
    params = layer.init(jax.random.PRNGKey(0), x_BxSxD)["params"]
    _, state = layer.apply({"params": params}, x_BxSxD, mutable=[MOE])
    stats = moe_metrics(state[MOE])
    x_TxD = x_BxSxD.reshape(-1, cfg.d_model)
    routing = route(x_TxD @ nn.unbox(params)["router"], 2)
    expected = np.bincount(np.asarray(routing.expert_A), minlength=4) / (2 * x_TxD.shape[0])
    load = np.asarray([stats[k] for k in load_keys(4)])
    np.testing.assert_allclose(load, expected, rtol=1e-6)
    assert float(stats["moe_max_load"]) == pytest.approx(4 * expected.max())


@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow), True])
def test_train_step_logs_the_load_histogram_averaged_over_layers_and_microbatches(scan):
    cfg = moe_cfg(n_layers=3, scan_layers=scan, vocab_size=64, max_seq_len=16)
    model = build_model(cfg)
    batch = padded_batch(np.random.default_rng(0), (16,) * 4, 16, 64)  # no padding
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"])
    tx = optax.sgd(0.1)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))
    keys = load_keys(cfg.moe_experts)
    loads = []
    for k in (1, 2):  # microbatches of equal size: their mean share is the whole batch's
        _, metrics = jax.jit(make_train_step(model, tx, microbatches=k))(state, batch)
        loads.append(np.asarray([metrics[key] for key in keys]))
    assert loads[0].sum() == pytest.approx(1.0, abs=1e-5) and (loads[0] >= 0).all()
    np.testing.assert_allclose(loads[0], loads[1], atol=1e-6)
    # ...and it is the mean of what each of the 3 layers sowed.
    _, sown = model.apply({"params": params}, batch["inputs"], mutable=[MOE])
    rows = [
        np.asarray(leaf).reshape(-1, 4)
        for path, leaf in jax.tree_util.tree_leaves_with_path(sown[MOE])
        if "['load']" in jax.tree_util.keystr(path)
    ]
    per_layer_LxX = np.concatenate(rows)
    assert per_layer_LxX.shape == (3, 4)
    np.testing.assert_allclose(per_layer_LxX.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(loads[0], per_layer_LxX.mean(axis=0), atol=1e-6)


def test_dense_train_step_logs_no_moe_statistics():
    cfg = resolved_model("llama", n_layers=1, d_model=16, n_heads=2, vocab_size=64, max_seq_len=8)
    model = build_model(cfg)
    batch = padded_batch(np.random.default_rng(0), (8, 8), 8, 64)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"])
    tx = optax.sgd(0.1)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(1))
    _, metrics = jax.jit(make_train_step(model, tx))(state, batch)
    assert not [k for k in metrics if k.startswith("moe_")]


def test_flops_count_active_experts_and_params_report_total_and_active():
    moe = moe_cfg(moe_top_k=2, moe_d_ff=16, moe_shared_experts=1)
    dense = moe_cfg(moe_experts=0, d_ff=3 * 16)  # top-2 + 1 shared = one 48-wide MLP
    router = moe.n_layers * moe.d_model * moe.moe_experts
    assert flops_per_token(moe, 16) == flops_per_token(dense, 16) + 6 * router
    total, active = param_count(moe), active_param_count(moe)
    expert = 3 * moe.d_model * 16
    assert total - active == moe.n_layers * (4 - 2) * expert
    assert param_count(moe_cfg(moe_experts=8, moe_shared_experts=1)) - total == moe.n_layers * (
        4 * expert + 4 * 32
    )


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.moe_experts=4", "model.moe_top_k=5"], r"moe_top_k=5 .*between 1 and"),
        (["model.moe_experts=4", "model.moe_router=relu"], r"moe_router='relu'"),
        (["model.moe_experts=4", "model.moe_every=2", "model.scan_layers=true"], r"moe_every=2"),
        (["model.family=lstm", "model.moe_experts=4"], r"Transformer families only"),
        (["model.moe_experts=6", "mesh.expert=4"], r"moe_experts=6 .*mesh.expert=4"),
        (["model.moe_experts=4", "model.moe_capacity_factor=-1"], r"capacity_factor=-1"),
    ],
)
def test_bad_moe_settings_are_refused_in_one_sentence(overrides, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(None, ["model.n_layers=2", *overrides])
    assert_one_sentence(str(err.value))


@pytest.mark.slow  # about 20 s on 2 idle cores
def test_tiny_moe_model_trains_and_logs_its_router(tmp_path):
    overrides = [
        *TINY_MODEL, "model.family=llama", "model.moe_experts=4", "model.moe_top_k=2",
        "model.moe_d_ff=32", "train.steps=30", "train.batch_size=8", "train.log_every=5",
        "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0",
        "optimizer.lr=1e-2", "optimizer.warmup_steps=3", "checkpoint.every_steps=0",
    ]  # fmt: skip
    assert cli.main(["train", "-w", str(tmp_path / "run"), "--no-progress", *overrides]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r.get("split") == "train"]
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped", "moe_max_load", *load_keys(4)):
        assert key in train[-1], key
    assert sum(train[-1][k] for k in load_keys(4)) == pytest.approx(1.0, abs=1e-5)
    assert 1.0 <= train[-1]["moe_aux_loss"] < 2.0 and train[-1]["moe_dropped"] == 0.0


# ------------------------------------------- expert parallelism on 8 fake devices (subprocess)

SHARDED_MESHES = {  # (data, fsdp, tensor, sequence, expert)
    "e8": (1, 1, 1, 1, 8),
    "d2e4": (2, 1, 1, 1, 4),
    "f2t2e2": (1, 2, 2, 1, 2),
}


def worker() -> dict:
    """MoE layer output and gradients on each mesh, for the dropless and capacity layers."""
    from jax.sharding import NamedSharding

    from jaxlm.config import MeshConfig
    from jaxlm.parallel.sharding import MESH_AXES, logical_sharding, make_mesh
    from jaxlm.train.step import _with_rules

    assert len(jax.devices()) == 8
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 32))
    out = {}
    for cf in (0.0, 1.0):
        cfg = moe_cfg(moe_experts=8, moe_capacity_factor=cf, moe_shared_experts=1)
        layer = MoeMlp(cfg)
        boxed = layer.init(jax.random.PRNGKey(1), x)["params"]

        def loss(p, x, layer=layer):
            y, state = layer.apply({"params": p}, x, mutable=[MOE])
            return jnp.sum(jnp.sin(y)) + moe_metrics(state[MOE])["moe_aux_loss"]

        results = {}
        for name, sizes in {"single": (1,) * 5, **SHARDED_MESHES}.items():
            devices = jax.devices()[:1] if name == "single" else None
            mesh = make_mesh(MeshConfig(**dict(zip(MESH_AXES, sizes, strict=True))), devices)
            p_sh = logical_sharding(boxed, mesh)
            x_sh = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
            params = jax.device_put(nn.unbox(boxed), p_sh)
            f = jax.jit(_with_rules(jax.value_and_grad(loss, argnums=(0, 1)), mesh))
            val, grads = f(params, jax.device_put(x, x_sh))
            specs = {str(s.spec) for s in jax.tree.leaves(p_sh)}
            results[name] = (float(val), jax.device_get(grads), specs)
        ref_val, ref_grads, _ = results.pop("single")
        for name, (val, grads, specs) in results.items():
            diff = max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
            )
            sharded = any("expert" in s for s in specs)
            out[f"{name}/cf{cf}"] = {"val": abs(val - ref_val), "grad": diff, "sharded": sharded}
    return out


@pytest.fixture(scope="module")
def sharded_report() -> dict:
    p = subprocess.run(
        [sys.executable, __file__],
        env=fake_devices_env(8, FAST_XLA),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_expert_sharded_layer_matches_single_device(sharded_report):
    assert len(sharded_report) == 2 * len(SHARDED_MESHES)
    for name, r in sharded_report.items():
        assert r["sharded"], f"{name}: no parameter is split over the expert axis"
        assert r["val"] <= 1e-4 and r["grad"] <= 1e-5, f"{name}: {r}"


if __name__ == "__main__":
    print(json.dumps(worker()))
