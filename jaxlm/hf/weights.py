"""Hugging Face tensor names and layouts <-> jaxlm's parameter tree: GPT-2, Llama, Mixtral.

Each HF tensor maps to one or more jaxlm leaves (GPT-2 fuses q, k, v into `c_attn`). A
tensor is brought to [inputs, outputs] (torch `Linear` stores [out, in], GPT-2's `Conv1D`
already [in, out]), split evenly along outputs, and each piece reshaped to its leaf's shape;
to-hf runs the same steps backwards. Only reshapes, transposes and slices: the round trip
is exact bit for bit.

Rotary embeddings need no permutation: jaxlm pairs feature i with i + E/2 (half split),
which is exactly the `rotate_half` convention HF Llama checkpoints are stored in.

Mixtral stores each expert as its own Linear (`experts.{e}.w1` gate, `w3` up, `w2` down),
while jaxlm stacks a layer's experts along a leading axis ([X, D, F] / [X, F, D]). Such a
tensor names the index `expert` it fills in its leaf: from-hf collects the X slices and
hands the leaf on once it is whole; to-hf reads each stacked leaf once and cuts it up.
The router (`gate.weight`, [X, D]) is an ordinary transposed Linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError

Path = tuple[str, ...]


@dataclass(frozen=True)
class Tensor:
    """One HF tensor: its name (without the model prefix) and the jaxlm leaves it holds."""

    name: str
    leaves: tuple[Path, ...]
    n_in: int  # leading axes of each leaf that are inputs (0 for vectors)
    transpose: bool = False  # stored [out, in] (torch Linear)
    expert: int | None = None  # the slice of each leaf's leading (expert) axis it holds


def _norm_leaf(cfg: ModelConfig, module: tuple[str, ...], what: str) -> Path:
    inner = "LayerNorm_0" if cfg.norm == "layernorm" else "RMSNorm_0"
    return (*module, inner, what)


def _gpt2_tensors(cfg: ModelConfig) -> list[Tensor]:
    out = [
        Tensor("wte.weight", (("embed", "embedding"),), 1),
        Tensor("wpe.weight", (("pos_embed", "embedding"),), 1),
        Tensor("ln_f.weight", (_norm_leaf(cfg, ("final_norm",), "scale"),), 0),
        Tensor("ln_f.bias", (_norm_leaf(cfg, ("final_norm",), "bias"),), 0),
    ]
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", (("head", "kernel"),), 1, transpose=True))
    for i in range(cfg.n_layers):
        b, h = f"block_{i}", f"h.{i}"
        qkv = lambda w, b=b: tuple((b, "attn", p, w) for p in ("query", "key", "value"))  # noqa: E731
        out += [
            Tensor(f"{h}.attn.c_attn.weight", qkv("kernel"), 1),
            Tensor(f"{h}.attn.c_attn.bias", qkv("bias"), 0),
            Tensor(f"{h}.attn.c_proj.weight", ((b, "attn", "out", "kernel"),), 2),
            Tensor(f"{h}.attn.c_proj.bias", ((b, "attn", "out", "bias"),), 0),
            Tensor(f"{h}.mlp.c_fc.weight", ((b, "mlp", "up", "kernel"),), 1),
            Tensor(f"{h}.mlp.c_fc.bias", ((b, "mlp", "up", "bias"),), 0),
            Tensor(f"{h}.mlp.c_proj.weight", ((b, "mlp", "down", "kernel"),), 1),
            Tensor(f"{h}.mlp.c_proj.bias", ((b, "mlp", "down", "bias"),), 0),
        ]
        for hf_norm, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            for hf_what, what in (("weight", "scale"), ("bias", "bias")):
                out.append(
                    Tensor(f"{h}.{hf_norm}.{hf_what}", (_norm_leaf(cfg, (b, ours), what),), 0)
                )
    return out


def _mixtral_moe_tensors(cfg: ModelConfig, b: str, h: str) -> list[Tensor]:
    """One Mixtral layer's router and experts, each stacked leaf's experts in a row."""
    moe = f"{h}.block_sparse_moe"
    out = [Tensor(f"{moe}.gate.weight", ((b, "moe", "router"),), 1, transpose=True)]
    for hf_name, ours in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
        out += [
            Tensor(f"{moe}.experts.{e}.{hf_name}.weight", ((b, "moe", ours),), 1, True, e)
            for e in range(cfg.moe_experts)
        ]
    return out


def _llama_tensors(cfg: ModelConfig) -> list[Tensor]:
    out = [
        Tensor("embed_tokens.weight", (("embed", "embedding"),), 1),
        Tensor("norm.weight", (_norm_leaf(cfg, ("final_norm",), "scale"),), 0),
    ]
    if not cfg.tie_embeddings:
        out.append(Tensor("lm_head.weight", (("head", "kernel"),), 1, transpose=True))
    projections = [
        ("self_attn.q_proj", ("attn", "query"), 1),
        ("self_attn.k_proj", ("attn", "key"), 1),
        ("self_attn.v_proj", ("attn", "value"), 1),
        ("self_attn.o_proj", ("attn", "out"), 2),
    ]
    if not cfg.moe_experts:
        projections += [
            ("mlp.gate_proj", ("mlp", "gate"), 1),
            ("mlp.up_proj", ("mlp", "up"), 1),
            ("mlp.down_proj", ("mlp", "down"), 1),
        ]
    for i in range(cfg.n_layers):
        b, h = f"block_{i}", f"layers.{i}"
        if cfg.moe_experts:
            out += _mixtral_moe_tensors(cfg, b, h)
        for hf_name, ours, n_in in projections:
            out.append(Tensor(f"{h}.{hf_name}.weight", ((b, *ours, "kernel"),), n_in, True))
            if cfg.bias:
                out.append(Tensor(f"{h}.{hf_name}.bias", ((b, *ours, "bias"),), 0))
        for hf_norm, ours in (
            ("input_layernorm", "attn_norm"),
            ("post_attention_layernorm", "mlp_norm"),
        ):
            out.append(Tensor(f"{h}.{hf_norm}.weight", (_norm_leaf(cfg, (b, ours), "scale"),), 0))
    return out


# Non-parameter buffers some checkpoints carry (causal masks, rotary frequencies).
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_PREFIX = {"gpt2": "transformer.", "llama": "model.", "mixtral": "model."}
CLASSES = "GPT2LMHeadModel/LlamaForCausalLM/MixtralForCausalLM"


def tensor_table(kind: str, cfg: ModelConfig) -> list[Tensor]:
    """Every HF tensor of a `kind` ('gpt2' | 'llama' | 'mixtral') model with this config;
    Llama and Mixtral differ only in `cfg.moe_experts`."""
    return _gpt2_tensors(cfg) if kind == "gpt2" else _llama_tensors(cfg)


def _hf_shape(t: Tensor, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    n_out = sum(math.prod(s[t.n_in :]) for s in shapes)
    shape = (math.prod(shapes[0][: t.n_in]), n_out) if t.n_in else (n_out,)
    return shape[::-1] if t.transpose else shape


def _get(tree: dict[str, Any], path: Path) -> Any:
    try:
        for key in path:
            tree = tree[key]
    except (KeyError, TypeError):
        raise ConfigError(
            f"The parameters have no '{'/'.join(path)}', so they are not laid out as jaxlm's "
            f"GPT-2/Llama/Mixtral Transformer; only those models convert."
        ) from None
    return tree


def _put(tree: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _strip(kind: str, name: str) -> str:
    prefix = _PREFIX[kind]
    return name[len(prefix) :] if name.startswith(prefix) else name


def params_from_hf(
    kind: str,
    cfg: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    abstract: dict[str, Any],
    leaf_fn: Callable[[np.ndarray, Any], Any] = lambda x, _: x,
) -> dict[str, Any]:
    """jaxlm's parameter tree from HF tensors, shapes checked against `abstract`.

    `tensors` is read one name at a time, and `leaf_fn(array, abstract_leaf)` (cast, place
    on a device) runs on each leaf as soon as it exists.
    """
    table = tensor_table(kind, cfg)
    by_name = {_strip(kind, k): k for k in tensors}
    wanted = {t.name for t in table}
    if cfg.tie_embeddings:  # a tied head may be stored anyway; it is the embedding
        wanted.add("lm_head.weight")
    extra = [k for k in by_name if k not in wanted and not k.endswith(_BUFFER_SUFFIXES)]
    if extra:
        raise ConfigError(
            f"The checkpoint holds tensor '{extra[0]}' that a {kind} model of this config.json "
            f"does not have ({len(extra)} such); only plain {CLASSES} weights, as "
            f"save_pretrained writes them, convert."
        )
    params: dict[str, Any] = {}
    stacks: dict[Path, tuple[np.ndarray, list[int]]] = {}  # expert leaves being filled
    for t in table:
        if t.name not in by_name:
            raise ConfigError(f"The checkpoint has no tensor '{t.name}' that config.json implies.")
        shapes = [tuple(_get(abstract, p).shape) for p in t.leaves]
        if t.expert is not None:
            shapes = [s[1:] for s in shapes]
        w = tensors[by_name[t.name]]
        if tuple(w.shape) != _hf_shape(t, shapes):
            raise ConfigError(
                f"Tensor '{t.name}' has shape {tuple(w.shape)} but config.json implies "
                f"{_hf_shape(t, shapes)}; the weights and config.json don't belong together."
            )
        w = w.T if t.transpose else w
        pieces = np.split(w, len(t.leaves), axis=-1)
        for path, shape, piece in zip(t.leaves, shapes, pieces, strict=True):
            leaf = np.ascontiguousarray(piece).reshape(shape)
            if t.expert is None:
                _put(params, path, leaf_fn(leaf, _get(abstract, path)))
                continue
            n_experts = _get(abstract, path).shape[0]
            stack, filled = stacks.setdefault(path, (np.empty((n_experts, *shape), w.dtype), []))
            stack[t.expert] = leaf
            filled.append(t.expert)
            if len(filled) == n_experts:  # every expert is in: the leaf is whole
                _put(params, path, leaf_fn(stacks.pop(path)[0], _get(abstract, path)))
    return params


def iter_params_to_hf(kind: str, cfg: ModelConfig, params: dict[str, Any]):
    """(full HF name, contiguous numpy tensor) pairs from jaxlm's parameter tree, one at a
    time: a tensor's leaves are read (np.asarray) only when it is built."""
    stacked: tuple[Path, np.ndarray] | None = None  # the expert leaf being cut up
    for t in tensor_table(kind, cfg):
        if t.expert is None:
            leaves = [np.asarray(_get(params, p)) for p in t.leaves]
        else:
            (path,) = t.leaves
            if stacked is None or stacked[0] != path:
                stacked = (path, np.asarray(_get(params, path)))
            leaves = [stacked[1][t.expert]]
        flat = [
            x.reshape(math.prod(x.shape[: t.n_in]), -1) if t.n_in else x.reshape(-1) for x in leaves
        ]
        w = np.concatenate(flat, axis=-1) if len(flat) > 1 else flat[0]
        w = w.T if t.transpose else w
        name = t.name if t.name.startswith("lm_head") else _PREFIX[kind] + t.name
        yield name, np.ascontiguousarray(w)
