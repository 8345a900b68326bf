"""The optax optimizer: AdamW, linear warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxlm.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to lr at warmup_steps, then cosine down to lr * min_lr_ratio at the end.

    Warmup starts at lr / (warmup_steps + 1) rather than 0, so the first step is not wasted.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (cfg.warmup_steps + 1),
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


NO_DECAY = ("bias", "scale")


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings) only; never on norm scales or biases.

    Decided by name as well as rank: attention biases are [heads, head_dim], 2-D but biases.
    """

    def decays(path, p) -> bool:
        name = getattr(path[-1], "key", None) if path else None
        return name not in NO_DECAY and p.ndim >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (if enabled), then AdamW with the schedule and masked decay."""
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
