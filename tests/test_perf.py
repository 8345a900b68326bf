"""FLOP accounting, peak lookup, scan_layers / remat equivalence, bench train and plot."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.models.scan import SCANNED, stack_blocks, unstack_blocks
from jaxlm.perf import peak
from jaxlm.perf.flops import attention_flops_per_token, flops_per_token, mfu, param_count
from jaxlm.train.loss import cross_entropy_sums

B, S = 2, 64


def _model_cfg(family: str, *overrides: str) -> config_lib.ModelConfig:
    base = [f"model.family={family}", "model.n_layers=2", "model.d_model=128", "model.n_heads=4"]
    base += ["model.vocab_size=1024", f"model.max_seq_len={S}", f"data.seq_len={S}"]
    return config_lib.load_config(None, base + list(overrides)).model


def _loss_fn(model):
    def loss(params, tokens_BxS):
        logits = model.apply({"params": params}, tokens_BxS)
        return cross_entropy_sums(logits, jnp.roll(tokens_BxS, -1, 1), jnp.ones(tokens_BxS.shape))[
            0
        ]

    return loss


@pytest.mark.parametrize("family", ["llama", "gpt2", "lstm", "gru", "hawk"])
def test_flops_match_xla_cost_analysis(family):
    """Our training FLOPs vs XLA's count for the compiled forward+backward, within 5%.

    What XLA counts that we don't: elementwise work (norms, activations, softmax, the loss,
    the recurrences' gating and the Hawk scan), and the masked half of causal attention
    (the XLA kernel computes the whole square; we halve it), which is added back here.
    What XLA counts less: HloCostAnalysis counts a while loop's body once, not once per
    step, so for LSTM/GRU the recurrent matmul inside `lax.scan` appears for one timestep.
    """
    cfg = _model_cfg(family)
    model = build_model(cfg)
    tokens = jnp.zeros((B, S), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    compiled = jax.jit(jax.grad(_loss_fn(model))).lower(params, tokens).compile()
    cost = compiled.cost_analysis()
    xla = float((cost[0] if isinstance(cost, list) else cost)["flops"])

    expected = (flops_per_token(cfg, S) + attention_flops_per_token(cfg, S)) * B * S
    if family in ("lstm", "gru"):
        gates = 4 if family == "lstm" else 3
        recurrent = 6 * cfg.n_layers * cfg.d_model * gates * cfg.d_model * B
        expected -= recurrent * (S - 1)
    assert xla == pytest.approx(expected, rel=0.05)
    assert xla >= 0.99 * expected  # elementwise work only ever adds


def test_flops_convention_on_the_bench_model():
    """6*N_matmul plus causal attention 6*L*S*d per token, by hand for configs/bench-cpu.yaml."""
    cfg = config_lib.load_config("configs/bench-cpu.yaml").model
    d, f, v, L, s = 512, 2048, 8192, 6, 256
    n_matmul = L * (4 * d * d + 3 * d * f) + d * v
    assert flops_per_token(cfg, s) == 6 * n_matmul + 6 * L * s * d
    assert flops_per_token(cfg, s, training=False) == 2 * n_matmul + 2 * L * s * d
    # Embedding (input) and head are separate: counted params include the embedding.
    assert param_count(cfg) == n_matmul + d * v + (2 * L + 1) * d
    assert mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)


def test_gpt2_small_config_is_the_124m_model():
    """configs/gpt2-small.yaml (the GPU MFU check) is GPT-2 small: 124M parameters, with the
    tied head counted once, at sequence 1024 in bfloat16."""
    cfg = config_lib.load_config("configs/gpt2-small.yaml")
    m = cfg.model
    assert (m.family, m.tie_embeddings, m.dtype, cfg.data.seq_len) == (
        "gpt2",
        True,
        "bfloat16",
        1024,
    )
    assert round(param_count(m) / 1e6) == 124
    assert flops_per_token(m, 1024) == pytest.approx(7.99e8, rel=0.01)


def test_peak_table_cache_and_override(tmp_path, monkeypatch):
    assert peak.table_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak.table_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak.table_peak("TPU v5 lite") == pytest.approx(197e12)
    assert peak.table_peak("TPU v5p") == pytest.approx(459e12)
    assert peak.table_peak("TPU v6 lite") == pytest.approx(918e12)
    assert peak.table_peak("Some CPU") is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(peak.ENV_OVERRIDE, raising=False)
    measured = iter([1e11, 5e10, 2e11])
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dtype: next(measured))
    # A measurement slowed by other jobs never lowers the cached best.
    assert [peak.cpu_peak(), peak.cpu_peak(), peak.cpu_peak()] == [1e11, 1e11, 2e11]
    assert list(json.loads((tmp_path / "jaxlm" / "peak.json").read_text()).values()) == [2e11]
    monkeypatch.setenv(peak.ENV_OVERRIDE, "5e12")
    assert peak.device_peak() == (5e12, f"${peak.ENV_OVERRIDE}")


def _loss_and_grads(cfg, params, tokens):
    return jax.jit(jax.value_and_grad(_loss_fn(build_model(cfg))))(params, tokens)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def plain():
    """A tiny Llama model's params, loss and gradients without any speed knob."""
    cfg = _model_cfg("llama", "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, 16), 0, 300)
    params = nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    return cfg, params, tokens, _loss_and_grads(cfg, params, tokens)


@pytest.mark.parametrize(
    "policy",
    [
        "full",
        "dots_saveable",
        "dots_with_no_batch_dims_saveable",
        "save_attention_output",
        "save_qkv_attention",
    ],
)
def test_remat_gives_the_same_loss_and_gradients(plain, policy):
    cfg, params, tokens, (loss, grads) = plain
    remat_cfg = dataclasses.replace(cfg, remat=policy)
    loss_r, grads_r = _loss_and_grads(remat_cfg, params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    _close(grads_r, grads)


@pytest.mark.parametrize("family,remat", [("llama", "none"), ("gpt2", "none"), ("llama", "full")])
def test_scan_layers_gives_the_same_loss_and_gradients(family, remat):
    cfg = _model_cfg(family, "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, 16), 0, 300)
    params = nn.unbox(build_model(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    loss, grads = _loss_and_grads(cfg, params, tokens)
    scan_cfg = dataclasses.replace(cfg, scan_layers=True, remat=remat)
    loss_s, grads_s = _loss_and_grads(scan_cfg, stack_blocks(params, 3), tokens)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    _close(unstack_blocks(grads_s, 3), grads)


def test_scanned_params_layout_and_round_trip():
    """A scanned model's params are the stacked blocks, with `layers` as the leading axis."""
    cfg = _model_cfg("gpt2", "model.d_model=32", "model.vocab_size=300", "model.n_layers=3")
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
    _close(back, real)


def test_knob_validation():
    with pytest.raises(ConfigError, match="model.remat='sometimes'"):
        config_lib.load_config(None, ["model.remat=sometimes"])
    with pytest.raises(ConfigError, match="model.matmul_precision"):
        config_lib.load_config(None, ["model.matmul_precision=fastest"])
    with pytest.raises(ConfigError, match="Transformer families only"):
        config_lib.load_config(None, ["model.family=lstm", "model.scan_layers=true"])


def test_matmul_precision_reaches_every_dot():
    from jaxlm.train.step import _loss_sums

    cfg = _model_cfg("llama", "model.d_model=32", "model.vocab_size=300", "model.n_layers=1")
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


TINY = [
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.vocab_size=300",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "train.batch_size=2",
]


def test_bench_train_writes_json_and_table(tmp_path, capsys):
    from jaxlm.bench.train import JSON_KEYS
    from jaxlm.cli import main

    out, table = tmp_path / "r.json", tmp_path / "t.md"
    argv = ["bench", "train", *TINY, "--steps", "2", "--warmup", "1", "--json", str(out)]
    assert main(argv + ["--table", str(table)]) == 0
    r = json.loads(out.read_text())
    assert set(JSON_KEYS) <= set(r)
    assert len(r["step_s"]) == 2 and r["tokens_per_step"] == 32
    assert r["tokens_per_sec"] == pytest.approx(32 / r["median_step_s"])
    assert 0 < r["mfu"] < 1.5 and r["peak_flops_per_device"] > 0 and r["compile_s"] > 0
    assert r["memory"] is None or r["memory"]["peak"] > 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 1 and "float32" in rows[0]
    assert json.loads(capsys.readouterr().out)["mfu"] == pytest.approx(r["mfu"])


def _write_run(d, losses, evals):
    d.mkdir()
    lines = [{"step": i + 1, "split": "train", "loss": v} for i, v in enumerate(losses)]
    lines += [{"step": s, "split": "eval", "loss": v} for s, v in evals]
    lines += [{"step": 2, "split": "perf", "tokens_per_sec": 5.0}]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")
    (d / "config.yaml").write_text("train:\n  batch_size: 4\ndata:\n  seq_len: 8\n")


def test_plot_writes_png_of_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from jaxlm.bench.plot import read_run
    from jaxlm.cli import main

    _write_run(tmp_path / "a", [5.0, 4.0, 3.5], [(0, 5.5), (3, 3.6)])
    _write_run(tmp_path / "b", [5.1, 4.2], [])
    run = read_run(tmp_path / "a")
    assert run.train == [(1, 5.0), (2, 4.0), (3, 3.5)] and run.eval == [(0, 5.5), (3, 3.6)]
    assert run.tokens_per_step == 32
    png = tmp_path / "out" / "loss.png"
    argv = ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(png), "--x", "tokens"]
    assert main(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "missing"), "-o", str(png)]) == 2


def test_stacked_dense_matches_separate_matmuls():
    """The fused q/k/v (gate/up) matmul and its hand-written backward equal plain autodiff."""
    from jaxlm.models.layers import stacked_dense

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
    _close(
        jax.grad(fused, argnums=(0, 1, 2, 3))(*args), jax.grad(plain, argnums=(0, 1, 2, 3))(*args)
    )


@pytest.mark.parametrize("kv_heads,q_offset", [(4, 0), (2, 0), (2, 3)])
def test_dense_attention_matches_reference(kv_heads, q_offset):
    """The CPU-laid-out attention equals the reference: values and gradients, packed rows,
    grouped-query heads, and queries continuing a cache (q_offset)."""
    from jaxlm.models.attention import attend

    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    s, t = 5, 5 + q_offset
    q = jax.random.normal(keys[0], (2, s, 4, 8))
    k = jax.random.normal(keys[1], (2, t, kv_heads, 8))
    v = jax.random.normal(keys[2], (2, t, kv_heads, 8))
    kv_seg = jnp.array([[1] * t, [1] * (t - 3) + [2] * 3])
    q_seg = kv_seg[:, q_offset:]

    def run(impl):
        def f(q, k, v):
            out = attend(
                q,
                k,
                v,
                q_segment_ids_BxS=q_seg,
                kv_segment_ids_BxT=kv_seg,
                q_offset=q_offset,
                impl=impl,
            )
            return jnp.sum(out * jnp.sin(jnp.arange(out.size).reshape(out.shape))), out

        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out_d), grads_d = run("dense")
    (_, out_r), grads_r = run("reference")
    np.testing.assert_allclose(out_d, out_r, rtol=1e-5, atol=1e-6)
    _close(grads_d, grads_r)


@pytest.mark.parametrize("batch,query_blocks,kv_heads", [(2, 2, 4), (3, 4, 2), (2, 3, 4)])
def test_blocked_causal_attention_matches_reference(batch, query_blocks, kv_heads):
    """Cutting causal attention into query blocks (each seeing keys up to its end) and batch
    halves changes no value or gradient: packed rows, grouped heads, an odd batch (no
    halves) and a block count that doesn't divide the length (falls back to one block)."""
    from jaxlm.models.attention import attention_mask, blocked_causal_attention, reference_attention

    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    s = 8
    q = jax.random.normal(keys[0], (batch, s, 4, 8))
    k = jax.random.normal(keys[1], (batch, s, kv_heads, 8))
    v = jax.random.normal(keys[2], (batch, s, kv_heads, 8))
    seg = jnp.array([[1] * s, [1] * 3 + [2] * 5, [1] * 6 + [2] * 2][:batch])
    mask = attention_mask(seg, seg, causal=True)
    probe = jnp.sin(jnp.arange(q.size).reshape(q.shape))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * probe)

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, mask, 0.3, query_blocks=query_blocks)

    def ref(q, k, v):
        return reference_attention(q, k, v, mask, 0.3)

    np.testing.assert_allclose(blocked(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    _close(
        jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v),
        jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v),
    )
