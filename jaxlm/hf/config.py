"""Hugging Face `config.json` <-> jaxlm ModelConfig for GPT-2, Llama and Mixtral.

Only architectures jaxlm computes exactly are accepted: anything else (another model type,
rope scaling, exact-erf GELU, per-layer attention scaling, ...) is refused with one sentence
naming the field, before any weight is read.

Mixtral is a Llama whose every MLP is a mixture of experts: softmax over all experts, the
top k kept and renormalised to sum to 1, no shared expert. jaxlm's `moe_router=softmax`
renormalises the same way when k > 1 but keeps the raw probability when k = 1 (Mixtral's
single gate is always 1), so only k >= 2 converts, in either direction.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError

SUPPORTED_TYPES = ("gpt2", "llama", "mixtral")
# MoE layouts jaxlm does not compute, with the reason given when one is refused.
UNSUPPORTED_MOE = {
    "qwen2_moe": "its shared expert is scaled by a learned sigmoid gate and its top-k weights "
    "are not renormalised, while jaxlm's shared experts are ungated",
    "qwen3_moe": "it normalises queries and keys per head (qk-norm), which jaxlm's attention "
    "does not do",
}
# GPT-2's "gelu_new" and torch's tanh GELU are the tanh approximation flax's nn.gelu computes.
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")

logger = logging.getLogger(__name__)


def _need(hf: dict[str, Any], key: str, model_type: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"config.json of this {model_type} model has no '{key}'; add it there.")
    return hf[key]


def _refuse(ok: bool, field: str, value: Any, supported: str) -> None:
    if not ok:
        raise ConfigError(
            f"config.json has {field}={value!r}, which jaxlm can't compute; it supports {supported}."
        )


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    _refuse(act in GPT2_ACTIVATIONS, "activation_function", act, " or ".join(GPT2_ACTIVATIONS))
    for key, want in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        got = hf.get(key, want)
        _refuse(got == want, key, got, f"only {key}={want}")
    d_model = _need(hf, "n_embd", "gpt2")
    n_inner = hf.get("n_inner")
    return ModelConfig(
        family="gpt2",
        vocab_size=_need(hf, "vocab_size", "gpt2"),
        d_model=d_model,
        n_layers=_need(hf, "n_layer", "gpt2"),
        n_heads=_need(hf, "n_head", "gpt2"),
        d_ff=n_inner,
        max_seq_len=hf.get("n_positions") or _need(hf, "n_ctx", "gpt2"),
        norm="layernorm",
        position="learned",
        mlp="gelu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bias=True,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        # jaxlm drops out embeddings and residual branches, GPT-2's embd/resid_pdrop.
        dropout=float(hf.get("resid_pdrop", 0.0)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    """The rotary base, refusing any scaled variant (old `rope_scaling` or new `rope_parameters`)."""
    scaling = hf.get("rope_scaling")
    _refuse(scaling is None, "rope_scaling", scaling, "only rope_scaling=null (plain RoPE)")
    params = hf.get("rope_parameters") or {}
    kind = params.get("rope_type", "default")
    _refuse(kind == "default", "rope_parameters.rope_type", kind, "only 'default' (plain RoPE)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict[str, Any], kind: str = "llama") -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    _refuse(act == "silu", "hidden_act", act, "only silu (SwiGLU)")
    d_model = _need(hf, "hidden_size", kind)
    n_heads = _need(hf, "num_attention_heads", kind)
    head_dim = hf.get("head_dim") or d_model // n_heads
    _refuse(
        head_dim * n_heads == d_model, "head_dim", head_dim, "only hidden_size/num_attention_heads"
    )
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    _refuse(
        attn_bias == mlp_bias, "mlp_bias", mlp_bias, f"only mlp_bias == attention_bias={attn_bias}"
    )
    n_kv = hf.get("num_key_value_heads") or n_heads
    return ModelConfig(
        family="llama",
        vocab_size=_need(hf, "vocab_size", kind),
        d_model=d_model,
        n_layers=_need(hf, "num_hidden_layers", kind),
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        d_ff=_need(hf, "intermediate_size", kind),
        max_seq_len=_need(hf, "max_position_embeddings", kind),
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attn_bias,
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _mixtral_config(hf: dict[str, Any]) -> ModelConfig:
    """A Llama ModelConfig with every MLP a softmax top-k mixture of experts."""
    n_experts = _need(hf, "num_local_experts", "mixtral")
    top_k = _need(hf, "num_experts_per_tok", "mixtral")
    _refuse(
        top_k >= 2,
        "num_experts_per_tok",
        top_k,
        "only >= 2 (Mixtral sets one expert's gate to 1, jaxlm keeps its router probability)",
    )
    jitter = hf.get("router_jitter_noise") or 0.0
    _refuse(jitter == 0, "router_jitter_noise", jitter, "only 0 (jaxlm has no router jitter)")
    window, positions = hf.get("sliding_window"), _need(hf, "max_position_embeddings", "mixtral")
    _refuse(
        window is None or window >= positions,
        "sliding_window",
        window,
        f"only null or >= max_position_embeddings={positions} (full causal attention)",
    )
    # Mixtral's projections never have biases, whatever attention_bias/mlp_bias say.
    llama = _llama_config({k: v for k, v in hf.items() if not k.endswith("_bias")}, "mixtral")
    return dataclasses.replace(
        llama, moe_experts=n_experts, moe_top_k=top_k, moe_router="softmax", moe_every=1
    )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The ModelConfig computing exactly what a GPT-2, Llama or Mixtral `config.json` describes."""
    kind = hf.get("model_type")
    if kind in UNSUPPORTED_MOE:
        raise ConfigError(
            f"config.json has model_type={kind!r}, which jaxlm can't compute because "
            f"{UNSUPPORTED_MOE[kind]}; of mixture-of-experts models only mixtral converts."
        )
    _refuse(kind in SUPPORTED_TYPES, "model_type", kind, ", ".join(SUPPORTED_TYPES))
    if kind == "gpt2":
        return _gpt2_config(hf)
    return _mixtral_config(hf) if kind == "mixtral" else _llama_config(hf)


def _check_mixtral(cfg: ModelConfig) -> None:
    """Refuse mixture-of-experts settings that Mixtral has no way to express."""
    problems = [
        (cfg.moe_shared_experts == 0, f"model.moe_shared_experts={cfg.moe_shared_experts}", "0"),
        (cfg.moe_every == 1, f"model.moe_every={cfg.moe_every}", "1 (every block MoE)"),
        (cfg.moe_router == "softmax", f"model.moe_router={cfg.moe_router}", "softmax"),
        (cfg.moe_top_k >= 2, f"model.moe_top_k={cfg.moe_top_k}", ">= 2 (Mixtral renormalises)"),
        (not cfg.bias, f"model.bias={cfg.bias}", "false"),
    ]
    for ok, setting, want in problems:
        if not ok:
            raise ConfigError(
                f"Mixtral, the Hugging Face MoE model to-hf writes, can't express {setting}; "
                f"only models with {setting.split('=')[0]}={want} convert."
            )


def hf_model_type(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'mixtral': the Hugging Face architecture with this model's math."""
    if cfg.lora_rank:
        raise ConfigError(
            f"model.lora_rank={cfg.lora_rank}: Hugging Face models have no place for LoRA "
            f"adapters; convert an export made with `jaxlm export --merge-lora` instead."
        )
    layout = (cfg.norm, cfg.position, cfg.mlp)
    if cfg.recurrent or layout not in (
        ("layernorm", "learned", "gelu"),
        ("rmsnorm", "rope", "swiglu"),
    ):
        raise ConfigError(
            f"model.family={cfg.family} with norm={cfg.norm}, position={cfg.position}, mlp={cfg.mlp} "
            f"has no Hugging Face counterpart; to-hf writes GPT-2 (layernorm, learned, gelu) and "
            f"Llama (rmsnorm, rope, swiglu) models."
        )
    if cfg.moe_experts and layout[0] == "layernorm":
        raise ConfigError(
            f"model.moe_experts={cfg.moe_experts} on a GPT-2 layout has no Hugging Face "
            f"counterpart; to-hf writes mixtures of experts as Mixtral (rmsnorm, rope, swiglu)."
        )
    if cfg.moe_experts:
        _check_mixtral(cfg)
        return "mixtral"
    if layout[0] == "layernorm" and not cfg.bias:
        raise ConfigError(
            "GPT-2 in Hugging Face always has biases, but this model has model.bias=false; "
            "only models with bias=true convert to GPT-2."
        )
    if layout[0] == "layernorm" and cfg.kv_heads != cfg.n_heads:
        raise ConfigError(
            f"GPT-2 has no grouped-query attention, but model.n_kv_heads={cfg.kv_heads}; "
            f"only n_kv_heads=n_heads converts to GPT-2."
        )
    return "gpt2" if layout[0] == "layernorm" else "llama"


def hf_config_from_model(cfg: ModelConfig, special_ids: dict[str, int]) -> dict[str, Any]:
    """A transformers `config.json` dict for GPT2LMHeadModel, LlamaForCausalLM or Mixtral."""
    kind = hf_model_type(cfg)
    ids = {f"{k}_token_id": v for k, v in special_ids.items() if v is not None and v >= 0}
    if kind == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": 0.0,
            "initializer_range": cfg.init_std,
            "tie_word_embeddings": bool(cfg.tie_embeddings),
            "dtype": "float32",
            **ids,
        }
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ff_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 4.x reads rope_theta, 5.x rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": bool(cfg.bias),
        "mlp_bias": bool(cfg.bias),
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "dtype": "float32",
        **ids,
    }
    if kind == "llama":
        return llama
    if cfg.moe_capacity_factor > 0:
        # A runtime key, so the weights are the same; only jaxlm's dropping of tokens differs.
        logger.warning(
            "model.moe_capacity_factor=%g drops tokens in jaxlm, but Mixtral is dropless: the "
            "exported model computes what jaxlm does with moe_capacity_factor=0.",
            cfg.moe_capacity_factor,
        )
    del llama["attention_bias"], llama["mlp_bias"]  # Mixtral has neither
    return llama | {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "intermediate_size": cfg.moe_ff_dim,
        "num_local_experts": cfg.moe_experts,
        "num_experts_per_tok": cfg.moe_top_k,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "output_router_logits": False,
    }
