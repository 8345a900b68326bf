"""Validation of a RunConfig: every value and cross-field constraint, checked before any JAX
work, each problem reported as one ConfigError sentence naming the key and the fix."""

from __future__ import annotations

import importlib.util
from typing import Any

from jaxlm.config.schema import (
    ATTENTION_IMPLS,
    CONTEXT_PARALLEL,
    DTYPES,
    LORA_TARGETS,
    MATMUL_PRECISIONS,
    MOE_ROUTERS,
    NAN_POLICIES,
    REMAT_POLICIES,
    WANDB_MODES,
    RunConfig,
)
from jaxlm.errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for k in keys:
        v = getattr(section, k)
        _require(v is None or v > 0, f"{name}.{k}={v} must be positive; set it to a value > 0.")


def _check_streaming(cfg: RunConfig) -> None:
    """data.streaming: raw files in data.corpus, a tokenizer, and a finite validation set."""
    d, t = cfg.data, cfg.train
    if not d.streaming:
        return
    _require(
        d.tokenizer is not None,
        "data.streaming=true needs data.tokenizer (a SentencePiece .model or tokenizer.json) to "
        "tokenize on the fly; set it, e.g. to one made by `jaxlm tokenizer train`.",
    )
    _require(
        not d.sources and not d.chat and d.corpus != "builtin",
        "data.streaming=true streams the raw files or globs of data.corpus (comma-separated), "
        "not data.sources, data.chat or the builtin corpus; set data.corpus to them.",
    )
    _require(
        t.eval_batches > 0,
        "data.streaming=true needs train.eval_batches > 0 (validation reads the held-out "
        "documents of a streamed corpus only that far); set it, e.g. train.eval_batches=8.",
    )
    for key, value, unset in (("workers", d.workers, 0), ("streams", d.streams, None)):
        _require(
            value == unset,
            f"data.{key}={value} does not apply to data.streaming=true, where each process "
            f"packs its own stream itself; set data.{key}={'null' if unset is None else unset}.",
        )


def _validate_sources(sources: list[dict[str, Any]] | None) -> None:
    """data.sources: a non-empty list of {path: str, weight: positive number}."""
    if sources is None:
        return
    _require(bool(sources), "data.sources is an empty list; give at least one source or null.")
    for i, src in enumerate(sources):
        ok = isinstance(src, dict) and set(src) <= {"path", "weight"} and "path" in src
        _require(
            ok and isinstance(src["path"], str) and bool(src["path"].strip()),
            f"data.sources[{i}]={src!r} must be a mapping {{path: DIR, weight: W}}.",
        )
        w = src.get("weight", 1.0)
        _require(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0,
            f"data.sources[{i}].weight={w!r} must be a positive number (a share of the tokens).",
        )


def _validate_moe(m: Any) -> None:
    """The mixture-of-experts keys (jaxlm.models.moe)."""
    _require(m.moe_experts >= 0, f"model.moe_experts={m.moe_experts} must be >= 0 (0: dense).")
    if not m.moe_experts:
        return
    _require(
        not m.recurrent,
        f"model.moe_experts={m.moe_experts} applies to Transformer families only, not "
        f"model.family={m.family!r}; set model.moe_experts=0.",
    )
    _positive(m, "model", ("moe_d_ff", "moe_every"))
    _require(
        1 <= m.moe_top_k <= m.moe_experts,
        f"model.moe_top_k={m.moe_top_k} must be between 1 and model.moe_experts="
        f"{m.moe_experts}; route each token to fewer experts or add experts.",
    )
    _require(
        m.moe_shared_experts >= 0,
        f"model.moe_shared_experts={m.moe_shared_experts} must be >= 0.",
    )
    _require(
        m.moe_every <= m.n_layers,
        f"model.moe_every={m.moe_every} exceeds model.n_layers={m.n_layers}, so no block "
        f"would be MoE; use a value <= n_layers or set model.moe_experts=0.",
    )
    _require(
        not m.scan_layers or m.moe_every == 1,
        f"model.scan_layers needs identical blocks but model.moe_every={m.moe_every} mixes "
        f"dense and MoE blocks; set model.moe_every=1 or model.scan_layers=false.",
    )
    for k in ("moe_aux_loss_weight", "moe_z_loss_weight", "moe_capacity_factor"):
        v = getattr(m, k)
        _require(v >= 0.0, f"model.{k}={v} must be >= 0.")


def _validate_lora(m: Any) -> None:
    """The LoRA keys (jaxlm.models.lora)."""
    _require(
        type(m.lora_rank) is int and m.lora_rank >= 0,
        f"model.lora_rank={m.lora_rank!r} must be an integer >= 0 (0: LoRA off).",
    )
    _require(
        type(m.lora_alpha) in (int, float) and m.lora_alpha > 0,
        f"model.lora_alpha={m.lora_alpha!r} must be a positive number (adapters scale by "
        f"alpha/lora_rank).",
    )
    names = (
        [t.strip() for t in m.lora_targets.split(",")] if isinstance(m.lora_targets, str) else []
    )
    bad = [t for t in names if t not in LORA_TARGETS]
    _require(
        bool(names) and not bad and len(set(names)) == len(names),
        f"model.lora_targets={m.lora_targets!r} must be a comma list of distinct kernels "
        f"from {', '.join(LORA_TARGETS)}, e.g. q,v.",
    )
    _require(
        not m.lora_rank or not m.recurrent,
        f"model.lora_rank={m.lora_rank} applies to Transformer families (gpt2, llama) only, "
        f"not model.family={m.family!r}; set model.lora_rank=0.",
    )


def validate(cfg: RunConfig) -> None:
    """Check every value and every cross-field constraint; raise ConfigError on the first."""
    m, d, o, t, c, mesh = cfg.model, cfg.data, cfg.optimizer, cfg.train, cfg.checkpoint, cfg.mesh
    _positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"))
    _positive(m, "model", ("max_seq_len", "rope_theta", "norm_eps", "init_std"))
    _positive(m, "model", ("rnn_width", "conv_width"))
    _require(
        m.family != "hawk" or m.rnn_dim % m.n_heads == 0,
        f"model.n_heads={m.n_heads} does not divide model.rnn_width={m.rnn_dim}; "
        f"choose an rnn_width that n_heads divides.",
    )
    _require(
        m.recurrent or m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model}; "
        f"choose n_heads that divides d_model.",
    )
    _require(
        m.recurrent or m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads={m.n_heads}; "
        f"choose n_kv_heads that divides n_heads.",
    )
    for key, allowed in (
        ("norm", ("layernorm", "rmsnorm")),
        ("position", ("learned", "rope")),
        ("mlp", ("gelu", "swiglu")),
        ("attention", ATTENTION_IMPLS),
        ("dtype", DTYPES),
        ("remat", REMAT_POLICIES),
        ("matmul_precision", MATMUL_PRECISIONS),
        ("moe_router", MOE_ROUTERS),
    ):
        v = getattr(m, key)
        if v is None and m.recurrent:  # an option this family does not use
            continue
        _require(
            v in allowed, f"model.{key}={v!r} is not supported; use one of {', '.join(allowed)}."
        )
    _require(
        m.recurrent or m.position != "rope" or m.head_dim % 2 == 0,
        f"Rotary positions need an even head dimension, but d_model/n_heads = {m.head_dim}; "
        f"change model.d_model or model.n_heads.",
    )
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1).")
    _require(
        not m.recurrent or (not m.scan_layers and m.remat == "none"),
        f"model.scan_layers and model.remat apply to Transformer families only, not "
        f"model.family={m.family!r}; set model.scan_layers=false and model.remat=none.",
    )
    _validate_moe(m)
    _validate_lora(m)
    _require(
        m.vocab_size >= 300 or d.tokenizer is not None,
        f"model.vocab_size={m.vocab_size} is too small for a byte-fallback tokenizer; "
        f"use at least 300.",
    )

    _positive(d, "data", ("seq_len", "doc_chars"))
    _require(
        m.recurrent or d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
        f"raise model.max_seq_len or lower data.seq_len.",
    )
    _require(
        0.0 < d.validation_fraction < 1.0,
        f"data.validation_fraction={d.validation_fraction} must be between 0 and 1 (exclusive).",
    )
    _validate_sources(d.sources)
    _positive(d, "data", ("streams",))
    _require(
        d.streams is None or t.batch_size % d.streams == 0,
        f"data.streams={d.streams} does not divide train.batch_size={t.batch_size}; "
        f"choose a divisor of the batch size.",
    )
    _require(d.prefetch >= 0, f"data.prefetch={d.prefetch} must be >= 0.")
    _require(
        d.workers >= 0,
        f"data.workers={d.workers} must be >= 0; set 0 to read and pack in the training process.",
    )
    _check_streaming(cfg)
    _require(
        d.cache_dir is None or "://" not in d.cache_dir,
        f"data.cache_dir={d.cache_dir!r} must be a local directory (shards are memory-mapped "
        "from it); name a local path or null.",
    )

    _positive(o, "optimizer", ("lr",))
    _positive(t, "train", ("steps",))  # before the warmup check, which compares with it
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps={o.warmup_steps} must be >= 0.")
    _require(
        o.warmup_steps <= t.steps,
        f"optimizer.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}; "
        f"lower the warmup or train longer.",
    )
    _require(
        0.0 <= o.min_lr_ratio <= 1.0, f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]."
    )
    for k in ("b1", "b2"):
        v = getattr(o, k)
        _require(0.0 <= v < 1.0, f"optimizer.{k}={v} must be in [0, 1).")
    _positive(o, "optimizer", ("eps",))
    for k in ("weight_decay", "grad_clip"):
        v = getattr(o, k)
        _require(v >= 0.0, f"optimizer.{k}={v} must be >= 0.")

    for k in ("data", "fsdp", "tensor", "sequence", "expert"):
        v = getattr(mesh, k)
        _require(v == -1 or v >= 1, f"mesh.{k}={v} must be a positive size or -1 (the rest).")
    mesh_axes = ("data", "fsdp", "tensor", "sequence", "expert")
    auto = [k for k in mesh_axes if getattr(mesh, k) == -1]
    _require(
        len(auto) <= 1,
        f"Only one mesh axis may be -1, but {', '.join('mesh.' + a for a in auto)} are; fix all but one.",
    )
    _require(
        not m.moe_experts or mesh.expert == -1 or m.moe_experts % mesh.expert == 0,
        f"model.moe_experts={m.moe_experts} can't be split evenly over mesh.expert="
        f"{mesh.expert}; make the expert count a multiple of mesh.expert or change mesh.expert.",
    )
    for k, axis in (("dcn_data", "data"), ("dcn_fsdp", "fsdp")):
        v, size = getattr(mesh, k), getattr(mesh, axis)
        _require(v >= 1, f"mesh.{k}={v} must be a positive number of slices/nodes; use 1 for one.")
        _require(
            size == -1 or size % v == 0,
            f"mesh.{k}={v} does not divide mesh.{axis}={size}, its total size over all "
            f"slices/nodes; make mesh.{axis} a multiple of {v}.",
        )

    _require(c.every_steps >= 0, f"checkpoint.every_steps={c.every_steps} must be >= 0.")
    _require(c.every_minutes >= 0, f"checkpoint.every_minutes={c.every_minutes} must be >= 0.")
    _require(c.keep_every >= 0, f"checkpoint.keep_every={c.keep_every} must be >= 0.")
    _require(
        not (c.keep_every and c.every_steps) or c.keep_every % c.every_steps == 0,
        f"checkpoint.keep_every={c.keep_every} is not a multiple of checkpoint.every_steps="
        f"{c.every_steps}, so those steps are never saved; make it a multiple.",
    )
    _require(
        t.nan_policy in NAN_POLICIES,
        f"train.nan_policy={t.nan_policy!r} is not supported; use one of {', '.join(NAN_POLICIES)}.",
    )
    _positive(c, "checkpoint", ("keep", "agree_every"))
    _positive(t, "train", ("max_skipped_steps",))
    _check_profile_steps(t.profile_steps)
    _check_logging(cfg)

    _positive(t, "train", ("steps", "batch_size", "microbatches", "log_every"))
    _require(
        t.batch_size % t.microbatches == 0,
        f"train.microbatches={t.microbatches} does not divide train.batch_size={t.batch_size}; "
        f"choose a divisor of the batch size.",
    )
    for k in ("eval_every", "eval_batches", "sample_tokens", "top_k"):
        v = getattr(t, k)
        _require(v >= 0, f"train.{k}={v} must be >= 0.")
    _require(t.z_loss >= 0.0, f"train.z_loss={t.z_loss} must be >= 0.")
    _check_loss_chunk(cfg)
    _check_context_parallel(cfg)
    _require(t.temperature > 0.0, f"train.temperature={t.temperature} must be positive.")
    _require(
        t.init_from is None or bool(t.init_from.strip()),
        "train.init_from is empty; give a run, export or converted directory, or null.",
    )


def _check_loss_chunk(cfg: RunConfig) -> None:
    """train.loss_chunk: 0 (off) or tokens per chunk; with a sequence-sharded mesh each chunk
    takes loss_chunk / mesh.sequence tokens from every shard, so it must divide evenly."""
    n, seq = cfg.train.loss_chunk, cfg.mesh.sequence
    _require(n >= 0, f"train.loss_chunk={n} must be >= 0 (0: the whole logits at once).")
    _require(
        n == 0 or seq <= 1 or (n % seq == 0 and cfg.data.seq_len % n == 0),
        f"train.loss_chunk={n} must be a multiple of mesh.sequence={seq} that divides "
        f"data.seq_len={cfg.data.seq_len}, so every chunk splits evenly over the sequence shards.",
    )


def _check_context_parallel(cfg: RunConfig) -> None:
    """model.context_parallel: a known strategy, on our flash kernel, over whole chunk pairs."""
    m, seq, n = cfg.model, cfg.mesh.sequence, cfg.data.seq_len
    cp = m.context_parallel
    _require(
        cp in CONTEXT_PARALLEL,
        f"model.context_parallel={cp!r} is not supported; use one of {', '.join(CONTEXT_PARALLEL)}.",
    )
    if cp == "none":
        return
    _require(
        not m.recurrent,
        f"model.context_parallel={cp} splits attention, which the recurrent family "
        f"{m.family} does not have; set model.context_parallel=none.",
    )
    _require(
        m.attention == "pallas",
        f"model.context_parallel={cp} runs on the Pallas flash kernel, not model.attention="
        f"{m.attention!r} (family {m.family}); set model.attention=pallas or context_parallel=none.",
    )
    _require(
        seq < 1 or n % (2 * seq) == 0,
        f"model.context_parallel={cp} cuts each sequence into 2*mesh.sequence={2 * seq} equal "
        f"chunks, which data.seq_len={n} does not divide; make data.seq_len a multiple of "
        f"{2 * seq}.",
    )


def _check_profile_steps(steps: list | None) -> None:
    """train.profile_steps: [first, last] or a list of such pairs, 1 <= first <= last."""
    if not steps:
        return
    windows = [steps] if all(isinstance(s, int) for s in steps) else steps
    for w in windows:
        ok = isinstance(w, list) and len(w) == 2 and all(type(s) is int for s in w)
        if not ok or not 1 <= w[0] <= w[1]:
            raise ConfigError(
                f"train.profile_steps={steps!r} must be [first, last] steps with "
                f"1 <= first <= last, or a list of such pairs, e.g. [20, 25]."
            )


def _check_logging(cfg: RunConfig) -> None:
    """The tracker settings, and the optional library a tracker needs."""
    lg = cfg.logging
    if lg.wandb_mode not in WANDB_MODES:
        raise ConfigError(
            f"logging.wandb_mode={lg.wandb_mode!r} is not supported; use one of "
            f"{', '.join(WANDB_MODES)}."
        )
    if lg.wandb_project is not None and not lg.wandb_project.strip():
        raise ConfigError("logging.wandb_project is empty; name a project, or null for no W&B.")
    if lg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logging.wandb_project={lg.wandb_project!r} needs Weights & Biases; install it "
            f"with pip install 'jaxlm[wandb]', or set logging.wandb_project=null."
        )
