"""Hugging Face Mixtral <-> jaxlm mixture-of-experts Llama: logits parity, exact round trips,
and refusals of what one side can't express.

Models are tiny and random-initialised in the test (no download); the tokenizer is the
byte-level BPE of test_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="Hugging Face parity tests need torch (pip install -e '.[test]')"
)
transformers = pytest.importorskip(
    "transformers", reason="Hugging Face parity tests need transformers (pip install -e '.[test]')"
)

import orbax.checkpoint as ocp  # noqa: E402
import test_hf  # noqa: E402
from conftest import assert_one_sentence  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_hf import VOCAB, assert_parity, hf_logits, jax_logits, save_hf, tokens  # noqa: E402

from jaxlm.config import DataConfig, ModelConfig, RunConfig, resolve, to_yaml  # noqa: E402
from jaxlm.errors import ConfigError  # noqa: E402
from jaxlm.hf.config import hf_config_from_model, hf_model_type  # noqa: E402
from jaxlm.hf.convert import from_hf, to_hf  # noqa: E402
from jaxlm.models import build_model  # noqa: E402
from jaxlm.runs import EXPORT_INFO, load_run  # noqa: E402

# About 70 s of compiles in all: the slow suite (pytest -m slow) runs it.
pytestmark = pytest.mark.slow

bpe_file = test_hf.bpe_file  # the byte-level BPE tokenizer fixture


def mixtral(top_k: int = 2, tie: bool = False):
    """A small random MixtralForCausalLM: 2 layers, 4 experts, hidden 32 (float32, eval)."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=top_k, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales start at 1: make them matter
                p.add_(0.1 * torch.randn_like(p))
            elif "gate.weight" in name:  # a wide router, so tokens spread over the experts
                p.normal_(0.0, 1.0)
    return model


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize(
    "top_k,tie,shard", [(2, False, False), (3, True, True)], ids=["top2", "top3-tied-sharded"]
)
def test_from_hf_logits_match_transformers(tmp_path, bpe_file, top_k, tie, shard):
    model = mixtral(top_k, tie)
    src = save_hf(model, tmp_path / "hf", bpe_file, shard=shard)
    from_hf(src, tmp_path / "jax")
    cfg = load_run(tmp_path / "jax").cfg.model
    assert (cfg.moe_experts, cfg.moe_top_k, cfg.moe_ff_dim, cfg.moe_every) == (4, top_k, 48, 1)
    assert (cfg.moe_router, cfg.moe_shared_experts, cfg.bias) == ("softmax", 0, False)
    toks = tokens()
    ours, ref = jax_logits(tmp_path / "jax", toks), hf_logits(model, toks)
    assert_parity(ours, ref)
    print(f"mixtral top-{top_k} from-hf max |logits diff| = {max_diff(ours, ref):.2e}")


def test_round_trip_is_identity(tmp_path, bpe_file):
    """from-hf then to-hf writes the very tensors save_pretrained wrote, bit for bit."""
    model = mixtral()
    src = save_hf(model, tmp_path / "hf", bpe_file)
    from_hf(src, tmp_path / "a")
    info = to_hf(tmp_path / "a", tmp_path / "hf2")
    assert info["model_type"] == "mixtral"
    before, after = (load_file(d / "model.safetensors") for d in (src, tmp_path / "hf2"))
    assert sorted(before) == sorted(after)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in after
    for name, x in before.items():
        assert after[name].dtype == x.dtype and np.array_equal(after[name], x), name
    hf_cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["MixtralForCausalLM"]
    want = {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 48}
    assert {k: hf_cfg[k] for k in want} == want
    # ... and back again: the same jaxlm model.
    from_hf(tmp_path / "hf2", tmp_path / "b")
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.cfg.model == b.cfg.model
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    toks = tokens(1)
    assert np.array_equal(hf_logits(reloaded, toks), hf_logits(model, toks))


def write_export(
    directory: Path, model: ModelConfig, tokenizer: Path, seed: int = 0, params: bool = True
) -> Path:
    """A jaxlm export of a freshly initialised `model` (as `jaxlm export` lays it out)."""
    directory.mkdir()
    for f in tokenizer.parent.iterdir():
        shutil.copyfile(f, directory / f.name)
    data = DataConfig(tokenizer=str(directory / tokenizer.name), seq_len=model.max_seq_len)
    cfg = resolve(RunConfig(model=model, data=data))
    (directory / "config.yaml").write_text(to_yaml(cfg))
    if not params:
        return directory
    init = jax.jit(build_model(cfg.model).init)
    variables = init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))
    params = nn.unbox(variables["params"])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((directory / "params").absolute(), params)
    info = {"source": "test", "step": 0, "dtype": "float32"}
    (directory / EXPORT_INFO).write_text(json.dumps(info))
    return directory


def moe_llama(**fields) -> ModelConfig:
    """A jaxlm MoE Llama as training would make it: GQA, its own expert width, and a router
    wide enough that tokens really spread over the experts."""
    kw = dict(
        family="llama", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        d_ff=64, max_seq_len=64, init_std=0.3, moe_experts=4, moe_top_k=2, moe_d_ff=24,
    )  # fmt: skip
    return resolve(RunConfig(model=ModelConfig(**{**kw, **fields}))).model


def test_jaxlm_moe_model_to_hf_matches_transformers(tmp_path, bpe_file):
    """A model as jaxlm trains it (scanned blocks: experts stacked [L, X, ...]) loads in
    transformers and computes the same logits."""
    src = write_export(tmp_path / "jax", moe_llama(scan_layers=True), bpe_file)
    to_hf(src, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    toks = tokens(2)
    ours, ref = jax_logits(src, toks), hf_logits(model, toks)
    assert_parity(ours, ref)
    print(f"jaxlm MoE to-hf max |logits diff| = {max_diff(ours, ref):.2e}")


@pytest.mark.parametrize(
    "fields,named",
    [
        (dict(moe_shared_experts=1), "model.moe_shared_experts=1"),
        (dict(moe_every=2), "model.moe_every=2"),
        (dict(moe_router="sigmoid"), "model.moe_router=sigmoid"),
        (dict(moe_top_k=1), "model.moe_top_k=1"),
        (dict(bias=True), "model.bias=True"),
    ],
)
def test_settings_mixtral_cannot_express_are_refused(fields, named):
    with pytest.raises(ConfigError, match=named) as e:
        hf_model_type(moe_llama(**fields))
    assert_one_sentence(str(e.value))


def test_to_hf_refuses_before_reading_parameters(tmp_path, bpe_file):
    """The refusal comes from config.yaml alone: this export has no parameters at all."""
    src = write_export(tmp_path / "jax", moe_llama(moe_router="sigmoid"), bpe_file, params=False)
    with pytest.raises(ConfigError, match="moe_router"):
        to_hf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "edit,field",
    [
        ({"num_experts_per_tok": 1}, "num_experts_per_tok"),
        ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"model_type": "qwen2_moe"}, "shared expert"),
        ({"model_type": "qwen3_moe"}, "qk-norm"),
    ],
)
def test_from_hf_refuses_what_jaxlm_cannot_compute(tmp_path, bpe_file, edit, field):
    src = save_hf(mixtral(), tmp_path / "hf", bpe_file)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ConfigError, match=field) as e:
        from_hf(src, tmp_path / "jax")
    assert_one_sentence(str(e.value))
    assert not (tmp_path / "jax").exists()


def test_sliding_window_past_the_context_is_accepted(tmp_path, bpe_file):
    """A window no shorter than max_position_embeddings never masks anything."""
    src = save_hf(mixtral(), tmp_path / "hf", bpe_file)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    from_hf(src, tmp_path / "jax")
    assert load_run(tmp_path / "jax").cfg.model.moe_experts == 4


def test_capacity_factor_exports_the_dropless_model(caplog):
    """moe_capacity_factor is a runtime key: to-hf warns and writes the same weights."""
    model = dataclasses.replace(moe_llama(), moe_capacity_factor=1.0)
    with caplog.at_level("WARNING", logger="jaxlm.hf.config"):
        hf = hf_config_from_model(model, {})
    assert hf["model_type"] == "mixtral" and "dropless" in caplog.text
