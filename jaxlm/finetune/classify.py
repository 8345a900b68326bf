"""Sequence classification on a pretrained LM: train, save, load, predict.

Trains `models.classifier.SequenceClassifier` (the LM body plus a dense head) on labelled
text; see `jaxlm.data.labeled` for the file formats. The workdir receives:
  classifier/       Orbax checkpoint of the classifier parameters
  classifier.json   model config, labels (class id -> name), max_len, pooling, source
  metrics.json      validation loss/accuracy history and the final numbers
  tokenizer.*       a copy of the tokenizer, so the directory stands alone"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError
from jaxlm.finetune.lm import source_config, source_tokenizer_path

CLASSIFIER_INFO = "classifier.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    if (Path(o.workdir) / CLASSIFIER_INFO).exists():
        raise ConfigError(
            f"--workdir '{o.workdir}' already holds a classifier; choose a new directory."
        )


def finetune_classifier(o: ClassifyOptions) -> dict[str, Any]:
    """Train a classifier on `o.train_file` from `o.checkpoint`; save it; return the metrics."""
    from jaxlm.data import labeled as fd
    from jaxlm.data.tokenizer import load_tokenizer

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
        _log(
            f"{cut} training and {val_cut} validation texts exceed --max-len={max_len} tokens "
            f"and were truncated to their first {max_len - 1} tokens plus end-of-text."
        )
    _log(
        f"{len(train_ex)} training / {len(val_ex)} validation examples, "
        f"{len(labels)} classes: {', '.join(labels)}"
    )

    from jaxlm.finetune import classify_train as finetune_train

    result = finetune_train.train_classifier(
        o, m, labels, (train_x, train_y), (val_x, val_y), max_len, log=_log
    )
    info = {
        "model": dataclasses.asdict(m),
        "labels": labels,
        "max_len": max_len,
        "bidirectional": o.bidirectional,
        "pooling": "forward last token + backward first token"
        if o.bidirectional
        else "last non-pad token",
        "source": str(Path(o.checkpoint).absolute()),
        "tokenizer": "tokenizer" + Path(tok_path).suffix,
        "options": dataclasses.asdict(o),
    }
    metrics = {k: v for k, v in result.items() if k != "params"}
    save_classifier(Path(o.workdir), result["params"], info, metrics, tok_path)
    return metrics


def save_classifier(
    workdir: Path, params: Any, info: dict[str, Any], metrics: dict[str, Any], tok_path: str
) -> None:
    """Write params (Orbax), classifier.json, metrics.json and the tokenizer into `workdir`."""
    import orbax.checkpoint as ocp

    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / "classifier.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from an interrupted save
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp.absolute(), params)
        ckpt.wait_until_finished()
    if (workdir / "classifier").exists():
        shutil.rmtree(workdir / "classifier")  # params without classifier.json: never complete
    tmp.rename(workdir / "classifier")
    shutil.copyfile(tok_path, workdir / info["tokenizer"])
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    # Written last: its presence marks a complete classifier.
    (workdir / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_classifier(workdir: str | Path):
    """(model, params, info, tokenizer) of a saved classifier."""
    import jax
    import orbax.checkpoint as ocp

    from jaxlm.data.tokenizer import load_tokenizer
    from jaxlm.models.classifier import SequenceClassifier, init_params

    workdir = Path(workdir)
    if not (workdir / CLASSIFIER_INFO).is_file():
        raise ConfigError(f"'{workdir}' holds no {CLASSIFIER_INFO}; run `jaxlm finetune classify`.")
    info = json.loads((workdir / CLASSIFIER_INFO).read_text(encoding="utf-8"))
    m = config_lib.ModelConfig(**info["model"])
    model = SequenceClassifier(m, len(info["labels"]), info["bidirectional"])
    abstract = jax.eval_shape(lambda: init_params(model, info["max_len"], 0))
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore((workdir / "classifier").absolute(), abstract)
    return model, params, info, load_tokenizer(str(workdir / info["tokenizer"]))


def predict(workdir: str | Path, texts: list[str], batch_size: int = 32) -> list[dict[str, Any]]:
    """Label and class probabilities of each text under a saved classifier."""
    import jax
    import jax.numpy as jnp

    from jaxlm.data import labeled as fd

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
