"""LoRA (jaxlm.models.lora): adapters beside frozen base kernels. A LoRA model at init is the
base model; fine-tuning changes only the adapters, which alone hold optimizer state; a
merged export is the same function; adapters shard like their base; bad settings are one
sentence."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_XLA,
    assert_one_sentence,
    cli_error,
    fake_devices_env,
    init_params,
    padded_batch,
    resolved_model,
    tiny_run_config,
)

from jaxlm import cli
from jaxlm.config import load_config, to_dict, validate
from jaxlm.errors import ConfigError
from jaxlm.finetune.lm import check_same_model, lm_finetune_config, load_init_params
from jaxlm.models import build_model, lora
from jaxlm.paths import as_path
from jaxlm.runs import abstract_params, load_run
from jaxlm.train.checkpoint import Checkpointer
from jaxlm.train.optimizer import optimizer_for
from jaxlm.train.resume import check_resumable

ALL = "q,k,v,o,mlp"
VARIANTS = {
    "gpt2": ("gpt2", {}),
    "llama-gqa": ("llama", {"n_kv_heads": 2}),
    "llama-scan": ("llama", {"scan_layers": True}),
}


def _model(name: str, **lora_fields):
    family, kw = VARIANTS[name]
    cfg = resolved_model(family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, **kw)
    return dataclasses.replace(cfg, max_seq_len=16, **lora_fields)


def _tokens() -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))


def _with_random_adapters(params, seed: int = 1):
    """`params` with every adapter leaf replaced by noise (B no longer zero)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(paths))
    leaves = [
        0.1 * jax.random.normal(k, x.shape) if lora.is_adapter(p) else x
        for k, (p, x) in zip(keys, paths, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --- the model -----------------------------------------------------------------------------


def _variants(default: str) -> list:
    """Every variant, only `default` in the default run (each costs compiles)."""
    return [n if n == default else pytest.param(n, marks=pytest.mark.slow) for n in VARIANTS]


@pytest.mark.parametrize("name", _variants("llama-gqa"))
def test_lora_model_at_init_is_bitwise_the_base_model(name):
    base_cfg, cfg = _model(name), _model(name, lora_rank=4, lora_targets=ALL)
    base = init_params(base_cfg, 16)
    _, adapters = lora.split(init_params(cfg, 16))
    params = lora.combine(base, adapters)
    tokens = _tokens()
    want = build_model(base_cfg).apply({"params": base}, tokens)
    got = build_model(cfg).apply({"params": params}, tokens)
    assert np.array_equal(np.asarray(want), np.asarray(got))
    # Every targeted kernel got A [in..., r] and B [r, out...] = 0; nothing else did.
    block = params["blocks"] if cfg.scan_layers else params["block_0"]
    for module in (
        *(block["attn"][k] for k in ("query", "key", "value", "out")),
        block["mlp"]["down"],
    ):
        a, b, w = module["lora_a"], module["lora_b"], module["kernel"]
        assert a.shape[-1] == b.shape[-1 - (w.ndim - a.ndim + 1)] == 4
        assert not np.any(b) and np.any(a)
    assert not lora.has_adapters(lora.split(params)[0])


def test_only_the_targets_get_adapters_and_they_carry_their_kernels_axis_names():
    cfg = _model("llama-gqa", lora_rank=2)  # the default targets: q, v
    boxed = build_model(cfg).init(jax.random.PRNGKey(0), _tokens())["params"]
    names = jax.tree.map(lambda x: x.names, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    attn = names["block_0"]["attn"]
    assert attn["query"]["lora_a"] == ("embed", "lora")
    assert attn["query"]["lora_b"] == ("lora", "heads", "head_dim")
    assert attn["value"]["lora_b"] == ("lora", "kv_heads", "head_dim")
    assert "lora_a" not in attn["key"] and "lora_a" not in attn["out"]
    assert not lora.has_adapters(names["block_0"]["mlp"])


@pytest.mark.parametrize("name", _variants("gpt2"))
def test_merged_params_give_the_adapted_models_logits(name):
    cfg = _model(name, lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    params = _with_random_adapters(init_params(cfg, 16))
    tokens = _tokens()
    adapted = build_model(cfg).apply({"params": params}, tokens)
    plain = dataclasses.replace(cfg, lora_rank=0)
    merged = build_model(plain).apply({"params": lora.merge(params, lora.lora_scale(cfg))}, tokens)
    base = build_model(plain).apply({"params": lora.split(params)[0]}, tokens)
    assert float(jnp.max(jnp.abs(adapted - base))) > 0.1  # the adapters matter
    np.testing.assert_allclose(merged, adapted, atol=1e-5, rtol=0)


def test_optimizer_gives_the_base_no_state_and_no_update():
    cfg = tiny_run_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=2))
    params = _with_random_adapters(init_params(cfg.model, 16))
    tx = optimizer_for(cfg, 10)
    state = tx.init(params)
    n_adapters = sum(lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
    shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim)
    want = sorted(
        2 * [x.shape for p, x in jax.tree_util.tree_leaves_with_path(params) if lora.is_adapter(p)]
    )
    assert len(shapes) == 2 * n_adapters and shapes == want  # Adam's mu and nu, adapters only
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        assert bool(jnp.any(u != 0)) == lora.is_adapter(path), jax.tree_util.keystr(path)


# --- fine-tuning, export -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(pretrained, tmp_path_factory):
    """The pretrained tiny run fine-tuned 2 steps with rank-4 adapters on every target."""
    out = tmp_path_factory.mktemp("lora") / "ft"
    argv = ["finetune", "lm", "--checkpoint", str(pretrained), "-w", str(out), "--no-progress"]
    argv += ["model.lora_rank=4", f"model.lora_targets={ALL}", "model.lora_alpha=8"]
    argv += ["train.steps=2", "train.eval_every=0", "checkpoint.every_steps=2"]
    argv += ["train.sample_tokens=0", "optimizer.warmup_steps=0", "optimizer.lr=1e-2"]
    assert cli.main(argv) == 0
    return out


def test_lora_finetune_changes_only_the_adapters(pretrained, lora_run):
    base, tuned = load_run(pretrained), load_run(lora_run)
    assert tuned.step == 2 and tuned.cfg.model.lora_rank == 4
    frozen, adapters = lora.split(tuned.params)
    assert jax.tree.structure(frozen) == jax.tree.structure(base.params)
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base.params), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # bitwise unchanged
    b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if lora.is_adapter(p)]
    assert b_leaves and all(np.any(np.asarray(x)) for x in b_leaves)  # B moved off zero
    # The saved train state: Adam's moments exist for the adapters only.
    abstract, _ = abstract_params(tuned.cfg)
    ckpt = Checkpointer(lora_run / "checkpoints", tuned.cfg.checkpoint, read_only=True)
    try:
        state = ckpt.restore_latest(abstract).state
    finally:
        ckpt.close()
    moments = [x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim]
    want = [x.shape for x in jax.tree.leaves(adapters)]
    assert sorted(moments) == sorted(2 * want)
    assert sum(int(np.prod(s)) for s in moments) == 2 * sum(int(np.prod(s)) for s in want)


def test_merged_export_is_the_same_model_without_adapters(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert cli.main(["export", "-w", str(lora_run), "-o", str(out), "--merge-lora"]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["merged_lora"] is True
    merged, tuned = load_run(out), load_run(lora_run)
    assert merged.cfg.model.lora_rank == 0 and not lora.has_adapters(merged.params)
    tokens = _tokens()
    want = build_model(tuned.cfg.model).apply({"params": tuned.params}, tokens)
    got = build_model(merged.cfg.model).apply({"params": merged.params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # ...so Hugging Face export takes it like any plain model.
    hf = tmp_path / "hf"
    assert cli.main(["convert", "to-hf", str(out), "--output", str(hf)]) == 0
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))


def test_merge_lora_of_a_plain_run_is_refused(pretrained, tmp_path, capsys):
    argv = ["export", "-w", str(pretrained), "-o", str(tmp_path / "x"), "--merge-lora"]
    assert "model.lora_rank=0" in cli_error(argv, capsys)


def test_a_lora_source_is_merged_when_the_run_has_other_lora_settings(lora_run, tmp_path):
    """init_from a LoRA run into a plain model starts from the merged model's function."""
    cfg = lm_finetune_config(str(lora_run), None, ["model.lora_rank=0"])
    _, shardings = abstract_params(cfg)
    shardings = jax.tree.map(lambda a: a.sharding, shardings)
    params = load_init_params(cfg, shardings)
    tuned = load_run(lora_run)
    tokens = _tokens()
    want = build_model(tuned.cfg.model).apply({"params": tuned.params}, tokens)
    got = build_model(cfg.model).apply({"params": params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# --- sharding ------------------------------------------------------------------------------


def worker() -> dict:
    """2 LoRA train steps on one device and on fsdp=2 x tensor=2 from the same init."""
    from jaxlm.config import MeshConfig
    from jaxlm.parallel.sharding import make_mesh, put_batch
    from jaxlm.train.state import init_train_state
    from jaxlm.train.step import jit_train_step, train_step_for

    cfg = tiny_run_config(batch_size=8)
    model_cfg = dataclasses.replace(
        _model("llama-gqa"), lora_rank=4, lora_targets=ALL, lora_alpha=8.0
    )
    cfg = dataclasses.replace(cfg, model=model_cfg)
    rng = np.random.default_rng(0)
    batch = padded_batch(rng, rng.integers(4, 17, 8), 16, 64)
    model, tx = build_model(cfg.model), optimizer_for(cfg, 10)
    out = {}
    for name, mesh_cfg, devices in (
        ("single", MeshConfig(data=1), jax.devices()[:1]),
        ("f2t2", MeshConfig(data=1, fsdp=2, tensor=2), None),
    ):
        mesh = make_mesh(mesh_cfg, devices)
        state, shardings = init_train_state(model, tx, 16, 0, mesh)
        step = jit_train_step(train_step_for(cfg, model, tx, 10), shardings, mesh)
        for _ in range(2):
            state, _ = step(state, put_batch(batch, mesh))
        q = shardings.params["block_0"]["attn"]["query"]
        out[name] = {
            "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
            "specs": [str(q[k].spec) for k in ("kernel", "lora_a", "lora_b")],
        }
    return out


def test_adapters_shard_like_their_base_and_match_one_device():
    env = fake_devices_env(4, FAST_XLA)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    single, sharded = res["single"], res["f2t2"]
    kernel, a, b = sharded["specs"]
    assert "fsdp" in kernel and "tensor" in kernel
    assert "fsdp" in a and "tensor" not in a  # A: the kernel's input axis (embed)
    assert "tensor" in b and "fsdp" not in b  # B: its output axes (heads)
    for x, y in zip(single["params"], sharded["params"], strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)


# --- config --------------------------------------------------------------------------------

BAD = [
    (["model.lora_rank=-1"], "model.lora_rank"),
    (["model.lora_rank=4", "model.lora_alpha=0"], "model.lora_alpha"),
    (["model.lora_rank=4", "model.lora_targets=q,x"], "model.lora_targets"),
    (["model.lora_rank=4", "model.lora_targets=q,q"], "model.lora_targets"),
    (["model.lora_rank=4", "model.lora_targets="], "model.lora_targets"),
    (["model.lora_rank=4", "model.family=lstm"], "Transformer families"),
    (["model.lora_rank=4", "model.family=hawk"], "Transformer families"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD)
def test_bad_lora_settings_are_one_sentence(overrides, needle):
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides))
    assert needle in str(e.value)
    assert_one_sentence(str(e.value))


def test_lora_settings_resume_rules():
    """A resume can't add adapters (another tree) but may change alpha; init_from may."""
    plain, adapted = load_config(None, []), load_config(None, ["model.lora_rank=4"])
    with pytest.raises(ConfigError, match=r"model\.lora_rank=4 .*LoRA adapters") as e:
        check_resumable(to_dict(plain), adapted, as_path("run"))
    assert_one_sentence(str(e.value))
    check_resumable(
        to_dict(adapted),
        load_config(None, ["model.lora_rank=4", "model.lora_alpha=2"]),
        as_path("run"),
    )
    check_resumable(to_dict(plain), load_config(None, ["model.lora_targets=q"]), as_path("run"))
    check_same_model(adapted.model, plain.model, "src")


def test_to_hf_refuses_unmerged_adapters(lora_run, tmp_path, capsys):
    err = cli_error(["convert", "to-hf", str(lora_run), "-o", str(tmp_path / "hf")], capsys)
    assert "--merge-lora" in err


if __name__ == "__main__":
    print(json.dumps(worker()))
