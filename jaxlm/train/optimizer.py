"""The optax optimizer: AdamW, linear warmup + cosine decay, global-norm clipping; with LoRA
only the adapters train."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from jaxlm.config import OptimizerConfig, RunConfig
from jaxlm.models.lora import trainable_mask


def lr_schedule(
    cfg: OptimizerConfig, total_steps: int, init_value: float | None = None
) -> optax.Schedule:
    """Linear warmup to lr at warmup_steps, then cosine down to lr * min_lr_ratio at the end.

    Warmup starts at `init_value`, by default lr / (warmup_steps + 1) rather than 0, so the
    first step is not wasted.
    """
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / (cfg.warmup_steps + 1) if init_value is None else init_value,
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


def top_level_groups(params: Any) -> Any:
    """Each parameter's group is the name of its top-level subtree ("backbone", "head")."""
    return {name: name for name in params}


def make_optimizer(
    cfg: OptimizerConfig,
    total_steps: int,
    *,
    schedule: optax.Schedule | None = None,
    lr_scale: Mapping[str, float] | None = None,
    groups: Callable[[Any], Any] = top_level_groups,
    trainable: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Clip by global norm (if enabled), then AdamW with the schedule and masked decay.

    `schedule` defaults to `lr_schedule(cfg, total_steps)`. With `lr_scale`, `groups(params)`
    names each parameter's group and every group runs its own AdamW at `lr_scale[group]`
    times the schedule; a group scaled by 0 is frozen: its updates are zero and it keeps no
    optimizer state. Clipping still sees all gradients. Without `lr_scale` (the LM) it is
    one AdamW over every parameter. With `trainable(params)` (a tree of bools, e.g. LoRA's
    adapters) only those leaves are clipped and updated; the rest get zero updates and no
    optimizer state.
    """
    if trainable is not None:
        inner = make_optimizer(cfg, total_steps, schedule=schedule)
        label = lambda params: jax.tree.map(  # noqa: E731
            lambda t: "train" if t else "frozen", trainable(params)
        )
        return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, label)
    schedule = lr_schedule(cfg, total_steps) if schedule is None else schedule
    if lr_scale is None:
        update = _adamw(cfg, schedule)
    else:
        parts = {
            group: _adamw(cfg, _scaled(schedule, scale)) if scale else optax.set_to_zero()
            for group, scale in lr_scale.items()
        }
        update = optax.multi_transform(parts, groups)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), update)
    return update


def _adamw(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )


def _scaled(schedule: optax.Schedule, scale: float) -> optax.Schedule:
    return schedule if scale == 1 else lambda step: scale * schedule(step)


def optimizer_for(cfg: RunConfig, total_steps: int) -> optax.GradientTransformation:
    """The LM optimizer of a run: over every parameter, or only the LoRA adapters."""
    trainable = trainable_mask if cfg.model.lora_rank else None
    return make_optimizer(cfg.optimizer, total_steps, trainable=trainable)
