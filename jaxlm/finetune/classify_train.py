"""The classifier's optimisation: AdamW with a lower backbone learning rate, pure jitted steps.

Runs on one device (the default one): classification sets are small, and the models that
fit one accelerator cover what this is for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm.config import ModelConfig
from jaxlm.data.labeled import batches
from jaxlm.models.classifier import SequenceClassifier, init_params, transfer_backbone
from jaxlm.train.optimizer import decay_mask

Batch = dict[str, jax.Array]


def make_optimizer(o, total_steps: int) -> optax.GradientTransformation:
    """AdamW per part: `lr` for the head, `backbone_lr` (lr/10 by default, 0 if frozen)."""
    warmup = int(total_steps * o.warmup_fraction)

    def adamw(peak: float) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(total_steps, warmup + 1), end_value=0.0
        )
        return optax.adamw(schedule, weight_decay=o.weight_decay, mask=decay_mask)

    backbone_lr = o.lr / 10 if o.backbone_lr is None else o.backbone_lr
    frozen = o.freeze_backbone or backbone_lr == 0
    parts = {"head": adamw(o.lr), "backbone": optax.set_to_zero() if frozen else adamw(backbone_lr)}
    labels = lambda params: {k: k for k in params}  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(parts, labels))


def make_steps(model: SequenceClassifier, tx: optax.GradientTransformation, frozen: bool):
    """(train_step, eval_step), both pure and jitted."""

    def losses(params, batch: Batch, rng):
        if frozen:  # no backward pass through a backbone that does not learn
            params = {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}
        logits_BxC = model.apply(
            {"params": params},
            batch["tokens"],
            batch["lengths"],
            deterministic=rng is None,
            rngs=None if rng is None else {"dropout": rng},
        )
        ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
        return ce_B, logits_BxC

    def objective(params, batch, rng):
        ce_B, _ = losses(params, batch, rng)
        w_B = batch["weights"]
        return jnp.sum(ce_B * w_B) / jnp.maximum(jnp.sum(w_B), 1.0)

    @jax.jit
    def train_step(params, opt_state, batch: Batch, rng):
        loss, grads = jax.value_and_grad(objective)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
        ce_B, logits_BxC = losses(params, batch, None)
        w_B = batch["weights"]
        correct_B = (jnp.argmax(logits_BxC, axis=-1) == batch["labels"]).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(ce_B * w_B),
            "correct": jnp.sum(correct_B * w_B),
            "n": jnp.sum(w_B),
        }

    return train_step, eval_step


def evaluate(eval_step, params, tokens, labels, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean loss and accuracy over a whole labelled set."""
    outs = [eval_step(params, b) for b in batches(tokens, labels, batch_size, pad_id=pad_id)]
    tot = {k: float(sum(jax.device_get(o[k]) for o in outs)) for k in ("loss_sum", "correct", "n")}
    return {"loss": tot["loss_sum"] / tot["n"], "accuracy": tot["correct"] / tot["n"]}


def train_classifier(
    o,
    m: ModelConfig,
    labels: list[str],
    train: tuple[list[list[int]], np.ndarray],
    val: tuple[list[list[int]], np.ndarray],
    max_len: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Initialise from the checkpoint, train for o.epochs, evaluate; returns params + metrics."""
    from jaxlm.runs import load_run

    run = load_run(o.checkpoint)
    pad = run.tokenizer.pad_id  # only fills masked positions; some tokenizers have none
    pad_id = pad if isinstance(pad, int) and pad >= 0 else 0
    model = SequenceClassifier(m, len(labels), o.bidirectional)
    params = init_params(model, max_len, o.seed)
    params, copied, fresh = transfer_backbone(params, run.params, o.bidirectional, o.checkpoint)
    log(
        f"Backbone from '{o.checkpoint}' (its step {run.step}): {copied} tensors copied"
        + (f", {fresh} freshly initialised" if fresh else "")
    )
    del run

    train_x, train_y = train
    steps_per_epoch = -(-len(train_x) // o.batch_size)
    total = steps_per_epoch * o.epochs
    tx = make_optimizer(o, total)
    frozen = o.freeze_backbone or o.backbone_lr == 0
    train_step, eval_step = make_steps(model, tx, frozen)
    opt_state = tx.init(params)
    dropout = m.dropout > 0 and not frozen
    base_rng = jax.random.PRNGKey(o.seed)
    shuffle = np.random.default_rng(o.seed)
    eval_every = o.eval_every or steps_per_epoch
    history: list[dict[str, float]] = []
    losses: list[jax.Array] = []
    step, t0 = 0, time.perf_counter()

    def run_eval() -> None:
        ev = evaluate(eval_step, params, *val, o.batch_size, pad_id)
        recent = [float(x) for x in jax.device_get(losses[-eval_every:])]
        rec = {"step": step, **ev, "train_loss": float(np.mean(recent)) if recent else None}
        history.append(rec)
        log(
            f"step {step}/{total}: val loss {ev['loss']:.4f}, val accuracy {ev['accuracy']:.3f}"
            + (f", train loss {rec['train_loss']:.4f}" if recent else "")
        )

    run_eval()
    for _ in range(o.epochs):
        order = shuffle.permutation(len(train_x))
        for batch in batches(train_x, train_y, o.batch_size, order, pad_id):
            rng = jax.random.fold_in(base_rng, step) if dropout else None
            params, opt_state, loss = train_step(params, opt_state, batch, rng)
            losses.append(loss)
            step += 1
            if step % eval_every == 0 and step != total:
                run_eval()
    run_eval()
    final = history[-1]
    return {
        "params": params,
        "val_accuracy": final["accuracy"],
        "val_loss": final["loss"],
        "initial_val_accuracy": history[0]["accuracy"],
        "steps": total,
        "train_examples": len(train_x),
        "val_examples": len(val[0]),
        "seconds": round(time.perf_counter() - t0, 2),
        "history": history,
    }
