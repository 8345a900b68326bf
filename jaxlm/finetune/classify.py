"""Sequence classification on a pretrained LM: train, save, load, predict.

Trains `models.classifier.SequenceClassifier` (the LM body plus a dense head) on labelled text;
see `jaxlm.data.labeled` for the file formats. Training is train/'s: its AdamW (the backbone in
its own parameter group at a lower learning rate, or frozen), its step builder and its
`TrainState`. It runs on the checkpoint's mesh (`runs.model_mesh`) like every other command: the
backbone restored straight into its shards, each process feeding its block of every batch's
rows, the same numbers on one process or several. The workdir (local, gs:// or s3://) receives:
  classifier/       Orbax checkpoint of the classifier parameters
  classifier.json   model config, labels (class id -> name), max_len, pooling, source
  metrics.json      validation loss/accuracy history and the final numbers
  tokenizer.*       a copy of the tokenizer, so the directory stands alone"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxlm.config import ModelConfig, OptimizerConfig
from jaxlm.data import labeled as fd
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import ConfigError
from jaxlm.finetune.lm import source_config, source_tokenizer_path
from jaxlm.models.classifier import SequenceClassifier, init_params, transfer_backbone
from jaxlm.parallel.sharding import (
    data_parallel_size,
    logical_sharding,
    process_rows,
    put_batch,
    replicated,
)
from jaxlm.paths import Path, absolute, as_path, copy_file, is_remote
from jaxlm.runs import load_run, model_mesh
from jaxlm.train import object_store
from jaxlm.train.optimizer import lr_schedule, make_optimizer
from jaxlm.train.state import TrainState, new_train_state
from jaxlm.train.step import StepFn, make_step

logger = logging.getLogger(__name__)

CLASSIFIER_INFO = "classifier.json"

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ClassifyOptions:
    """What `finetune_classifier` needs; the CLI fills it from its flags."""

    checkpoint: str
    train_file: str
    workdir: str
    validation_file: str | None = None
    validation_fraction: float = 0.1
    epochs: int = 3
    batch_size: int = 32
    max_len: int = 128
    lr: float = 1e-3
    backbone_lr: float | None = None  # None: lr / 10
    freeze_backbone: bool = False
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    eval_every: int = 0  # steps; 0: after every epoch
    bidirectional: bool = False
    seed: int = 0

    @property
    def frozen(self) -> bool:
        """Whether the backbone stays as the checkpoint has it."""
        return self.freeze_backbone or self.backbone_lr == 0


def _check_options(o: ClassifyOptions) -> None:
    for name in ("epochs", "batch_size", "max_len", "lr"):
        if getattr(o, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(o, name)} must be positive.")
    if o.backbone_lr is not None and o.backbone_lr < 0:
        raise ConfigError(f"--backbone-lr={o.backbone_lr} must be >= 0.")
    if o.max_len < 2:
        raise ConfigError(f"--max-len={o.max_len} must be at least 2 (bos and eos).")
    if o.eval_every < 0:
        raise ConfigError(f"--eval-every={o.eval_every} must be >= 0.")
    if (as_path(o.workdir, "--workdir") / CLASSIFIER_INFO).exists():
        raise ConfigError(
            f"--workdir '{o.workdir}' already holds a classifier; choose a new directory."
        )


def finetune_classifier(o: ClassifyOptions) -> dict[str, Any]:
    """Train a classifier on `o.train_file` from `o.checkpoint`; save it; return the metrics."""
    _check_options(o)
    src_cfg = source_config(o.checkpoint)
    m = src_cfg.model
    if o.bidirectional and m.family not in ("lstm", "gru"):
        raise ConfigError(
            f"--bidirectional needs an lstm or gru checkpoint, but '{o.checkpoint}' is "
            f"model.family={m.family!r}; drop --bidirectional."
        )
    max_len = o.max_len if m.recurrent else min(o.max_len, m.max_seq_len)
    train_ex = fd.read_labeled(o.train_file)
    if o.validation_file:
        val_ex = fd.read_labeled(o.validation_file)
    else:
        train_ex, val_ex = fd.split_examples(train_ex, o.validation_fraction, o.seed)
    labels = fd.label_names(train_ex)
    if len(labels) < 2:
        raise ConfigError(f"'{o.train_file}' has only the label {labels}; give two or more.")
    train_y = fd.label_ids(train_ex, labels, o.train_file)
    val_y = fd.label_ids(val_ex, labels, o.validation_file or o.train_file)
    tok_path = source_tokenizer_path(o.checkpoint, src_cfg)
    tok = load_tokenizer(tok_path)
    train_x, cut = fd.encode_texts(tok, [e.text for e in train_ex], max_len)
    val_x, val_cut = fd.encode_texts(tok, [e.text for e in val_ex], max_len)
    if cut or val_cut:
        logger.info(
            f"{cut} training and {val_cut} validation texts exceed --max-len={max_len} tokens "
            f"and were truncated to their first {max_len - 1} tokens plus end-of-text."
        )
    logger.info(
        f"{len(train_ex)} training / {len(val_ex)} validation examples, "
        f"{len(labels)} classes: {', '.join(labels)}"
    )

    result = train_classifier(o, m, labels, (train_x, train_y), (val_x, val_y), max_len)
    info = {
        "model": dataclasses.asdict(m),
        "labels": labels,
        "max_len": max_len,
        "bidirectional": o.bidirectional,
        "pooling": "forward last token + backward first token"
        if o.bidirectional
        else "last non-pad token",
        "source": str(absolute(o.checkpoint)),
        "tokenizer": "tokenizer" + as_path(tok_path).suffix,
        "options": dataclasses.asdict(o),
    }
    metrics = {k: v for k, v in result.items() if k != "params"}
    save_classifier(as_path(o.workdir), result["params"], info, metrics, tok_path)
    return metrics


# --- training ---------------------------------------------------------------------------------


def make_classifier_optimizer(o: ClassifyOptions, total_steps: int) -> optax.GradientTransformation:
    """train/'s AdamW: `lr` for the head, `backbone_lr` (lr/10 by default) or frozen backbone.

    Fine-tuning settings rather than pretraining ones: Adam's usual beta2 of 0.999, warmup
    from 0 over `warmup_fraction` of the steps, cosine decay to 0, gradients clipped to norm 1.
    """
    cfg = OptimizerConfig(
        lr=o.lr,
        warmup_steps=int(total_steps * o.warmup_fraction),
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=o.weight_decay,
        grad_clip=1.0,
    )
    backbone_lr = o.lr / 10 if o.backbone_lr is None else o.backbone_lr
    scale = {"head": 1.0, "backbone": 0.0 if o.frozen else backbone_lr / o.lr}
    schedule = lr_schedule(cfg, total_steps, init_value=0.0)
    return make_optimizer(cfg, total_steps, schedule=schedule, lr_scale=scale)


def _logits(model: SequenceClassifier, params: Any, batch: Batch, rng, frozen: bool) -> jax.Array:
    if frozen:  # no backward pass through a backbone that does not learn
        params = {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}
    return model.apply(
        {"params": params},
        batch["tokens"],
        batch["lengths"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )


def make_classifier_steps(
    model: SequenceClassifier, tx: optax.GradientTransformation, frozen: bool, dropout: bool
) -> tuple[StepFn, Any]:
    """(train_step, eval_step), both pure: train/'s step over example-weighted sums."""

    def loss_fn(params, batch: Batch, rng):
        logits_BxC = _logits(model, params, batch, rng, frozen)
        ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
        ce_sum = jnp.sum(ce_B * batch["weights"])
        return ce_sum, {"loss": ce_sum}

    def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
        logits_BxC = _logits(model, params, batch, None, frozen)
        ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch["labels"])
        w_B = batch["weights"]
        correct_B = (jnp.argmax(logits_BxC, axis=-1) == batch["labels"]).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(ce_B * w_B),
            "correct": jnp.sum(correct_B * w_B),
            "n": jnp.sum(w_B),
        }

    return make_step(loss_fn, tx, dropout=dropout), eval_step


def evaluate(eval_step, params, tokens, labels, rows: int, mesh: Mesh, pad_id: int) -> dict:
    """Mean loss and accuracy over a whole labelled set."""
    batches = fd.batches(tokens, labels, rows, pad_id=pad_id)
    outs = [eval_step(params, _local_rows(b, mesh)) for b in batches]
    tot = {k: float(sum(jax.device_get(o[k]) for o in outs)) for k in ("loss_sum", "correct", "n")}
    return {"loss": tot["loss_sum"] / tot["n"], "accuracy": tot["correct"] / tot["n"]}


def _local_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """The global batch as arrays split over the data-parallel axes; each process supplies
    its own block of rows."""
    return put_batch(process_rows(batch, mesh), mesh)


def _state_shardings(model: SequenceClassifier, tx, max_len: int, mesh: Mesh) -> TrainState:
    """NamedShardings of the classifier's train state on `mesh`, from its logical axes."""

    def init(rng):
        tokens, lengths = jnp.zeros((1, max_len), jnp.int32), jnp.ones((1,), jnp.int32)
        return new_train_state(model.init(rng, tokens, lengths)["params"], tx, rng)

    return logical_sharding(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)


def train_classifier(
    o: ClassifyOptions,
    m: ModelConfig,
    labels: list[str],
    train: tuple[list[list[int]], np.ndarray],
    val: tuple[list[list[int]], np.ndarray],
    max_len: int,
) -> dict[str, Any]:
    """Initialise from the checkpoint, train for o.epochs, evaluate; returns params + metrics.

    A batch of o.batch_size examples is padded with weight-0 rows to a multiple of the
    data-parallel devices, which changes no number: losses and gradients are weighted sums.
    """
    mesh = model_mesh(source_config(o.checkpoint))
    run = load_run(o.checkpoint, mesh=mesh)
    pad = run.tokenizer.pad_id  # only fills masked positions; some tokenizers have none
    pad_id = pad if isinstance(pad, int) and pad >= 0 else 0
    model = SequenceClassifier(m, len(labels), o.bidirectional)
    train_x, train_y = train
    steps_per_epoch = -(-len(train_x) // o.batch_size)
    total = steps_per_epoch * o.epochs
    tx = make_classifier_optimizer(o, total)
    shardings = _state_shardings(model, tx, max_len, mesh)
    params = jax.jit(lambda: init_params(model, max_len, o.seed), out_shardings=shardings.params)()
    params, copied, fresh = transfer_backbone(params, run.params, o.bidirectional, o.checkpoint)
    logger.info(
        f"Backbone from '{o.checkpoint}' (its step {run.step}): {copied} tensors copied"
        + (f", {fresh} freshly initialised" if fresh else "")
    )
    del run
    params = jax.device_put(params, shardings.params)  # where the copied backbone differs
    # Dropout keys are fold_in(PRNGKey(seed), step), as in the LM's step.
    make_state = lambda p: new_train_state(p, tx, jax.random.PRNGKey(o.seed))  # noqa: E731
    state = jax.jit(make_state, out_shardings=shardings)(params)
    del params
    step_fn, eval_fn = make_classifier_steps(model, tx, o.frozen, m.dropout > 0 and not o.frozen)
    rows = data_parallel_size(mesh) * -(-o.batch_size // data_parallel_size(mesh))
    train_step = jax.jit(
        step_fn,
        in_shardings=(shardings, None),  # the batch: as put_batch placed it
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        eval_fn,
        in_shardings=(shardings.params, None),
        out_shardings=replicated(mesh),
    )
    shuffle = np.random.default_rng(o.seed)
    eval_every = o.eval_every or steps_per_epoch
    history: list[dict[str, float]] = []
    losses: list[jax.Array] = []  # device arrays, read only at evaluations
    step, t0 = 0, time.perf_counter()

    def run_eval() -> None:
        ev = evaluate(eval_step, state.params, *val, rows, mesh, pad_id)
        recent = [float(x) for x in jax.device_get(losses[-eval_every:])]
        rec = {"step": step, **ev, "train_loss": float(np.mean(recent)) if recent else None}
        history.append(rec)
        logger.info(
            f"step {step}/{total}: val loss {ev['loss']:.4f}, val accuracy {ev['accuracy']:.3f}"
            + (f", train loss {rec['train_loss']:.4f}" if recent else "")
        )

    run_eval()
    for _ in range(o.epochs):
        order = shuffle.permutation(len(train_x))
        for batch in fd.batches(train_x, train_y, o.batch_size, order, pad_id, rows=rows):
            state, metrics = train_step(state, _local_rows(batch, mesh))
            losses.append(metrics["loss"])
            step += 1
            if step % eval_every == 0 and step != total:
                run_eval()
    run_eval()
    final = history[-1]
    return {
        "params": state.params,
        "val_accuracy": final["accuracy"],
        "val_loss": final["loss"],
        "initial_val_accuracy": history[0]["accuracy"],
        "steps": total,
        "train_examples": len(train_x),
        "val_examples": len(val[0]),
        "seconds": round(time.perf_counter() - t0, 2),
        "history": history,
    }


# --- the saved classifier ---------------------------------------------------------------------

# One plain Orbax tree in `classifier/` (an export's `params/` format), not a Checkpointer's
# numbered steps: that would change the layout and strand classifiers saved before.


def _save_params(path: Path, params: Any) -> None:
    with object_store.standard_checkpointer(path) as ckpt:
        ckpt.save(absolute(path), params)
        ckpt.wait_until_finished()


def _restore_params(path: Path, abstract: Any) -> Any:
    with object_store.standard_checkpointer(path) as ckpt:
        return ckpt.restore(absolute(path), abstract)


def save_classifier(
    workdir: Path, params: Any, info: dict[str, Any], metrics: dict[str, Any], tok_path: str
) -> None:
    """Write params (Orbax), classifier.json, metrics.json and the tokenizer into `workdir`.

    Every process writes its shards of the parameters; process 0 writes everything else.
    """
    primary, remote = jax.process_index() == 0, is_remote(workdir)
    tmp = workdir / ("classifier" if remote else "classifier.tmp")  # a bucket has no rename
    if primary:
        if not remote:
            workdir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # our own leftover from an interrupted save
            tmp.rmtree() if remote else shutil.rmtree(tmp)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm-classifier-save")
    _save_params(tmp, params)
    if not primary:
        return
    if not remote:
        if (workdir / "classifier").exists():
            shutil.rmtree(workdir / "classifier")  # params without classifier.json: incomplete
        tmp.rename(workdir / "classifier")
    copy_file(tok_path, workdir / info["tokenizer"])
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    # Written last: its presence marks a complete classifier.
    (workdir / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_classifier(workdir: str | Path):
    """(model, params, info, tokenizer) of a saved classifier."""
    workdir = as_path(workdir, "--workdir")
    if not (workdir / CLASSIFIER_INFO).is_file():
        raise ConfigError(f"'{workdir}' holds no {CLASSIFIER_INFO}; run `jaxlm finetune classify`.")
    info = json.loads((workdir / CLASSIFIER_INFO).read_text(encoding="utf-8"))
    m = ModelConfig(**info["model"])
    model = SequenceClassifier(m, len(info["labels"]), info["bidirectional"])
    abstract = jax.eval_shape(lambda: init_params(model, info["max_len"], 0))
    params = _restore_params(workdir / "classifier", abstract)
    return model, params, info, load_tokenizer(str(workdir / info["tokenizer"]))


def predict(workdir: str | Path, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Label and class probabilities of each text under a saved classifier."""
    model, params, info, tok = load_classifier(workdir)
    if not texts:
        return []
    tokens, _ = fd.encode_texts(tok, texts, info["max_len"])
    apply = jax.jit(lambda p, t, n: jax.nn.softmax(model.apply({"params": p}, t, n), axis=-1))
    out = []
    for batch in fd.batches(tokens, np.zeros(len(texts), np.int32), batch_size):
        probs = np.asarray(apply(params, jnp.asarray(batch["tokens"]), batch["lengths"]))
        for row in probs[: int(batch["weights"].sum())]:
            k = int(row.argmax())
            out.append({"label": info["labels"][k], "probability": float(row[k])})
    return out
