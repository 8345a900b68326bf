"""Fine-tuning from a pretrained checkpoint: the LM on new text, or a sequence classifier.

LM fine-tuning is ordinary training with `train.init_from` set: the run starts from the
source's parameters with a fresh optimizer at step 0, on the source's tokenizer, and the
model config must match the source's (its parameters must fit). Once the fine-tuning run
has checkpoints of its own, resuming continues from those.

Classification trains `models.classifier.SequenceClassifier` (the LM body plus a dense
head) on labelled text with AdamW; see `jaxlm.finetune_data` for the file formats. The
workdir receives:
  classifier/       Orbax checkpoint of the classifier parameters
  classifier.json   model config, labels (class id -> name), max_len, pooling, source
  metrics.json      validation loss/accuracy history and the final numbers
  tokenizer.*       a copy of the tokenizer, so the directory stands alone
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jaxlm import config as config_lib
from jaxlm.config import ConfigError, RunConfig

# Model settings that change how the model runs, not which parameters it has.
RUNTIME_MODEL_KEYS = ("dropout", "attention", "dtype", "remat", "matmul_precision")
CLASSIFIER_INFO = "classifier.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ LM fine-tuning


def source_config(path: str | Path) -> RunConfig:
    """The resolved config of a run, export or converted directory."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"'{path}' holds no config.yaml; give the directory of a jaxlm run, an export or "
            f"a converted Hugging Face model."
        )
    return config_lib.load_config(path / "config.yaml")


def source_tokenizer_path(path: str | Path, cfg: RunConfig) -> str:
    """The tokenizer file that belongs to a run, export or converted directory."""
    path = Path(path)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return str((path / name).absolute())
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    raise ConfigError(f"'{path}' holds no tokenizer.model or tokenizer.json; copy its tokenizer.")


def check_same_model(new: config_lib.ModelConfig, old: config_lib.ModelConfig, src: str) -> None:
    """Refuse a model config whose parameters would not be the source's."""
    new_d, old_d = dataclasses.asdict(new), dataclasses.asdict(old)
    for key in new_d:
        if key not in RUNTIME_MODEL_KEYS and new_d[key] != old_d.get(key):
            raise ConfigError(
                f"model.{key}={new_d[key]!r} differs from the checkpoint '{src}' "
                f"({old_d.get(key)!r}), so its parameters don't fit; drop that setting or "
                f"start from a matching checkpoint."
            )


def resolve_init_from(cfg: RunConfig) -> RunConfig:
    """Check `train.init_from` against `cfg` and default data.tokenizer to the source's."""
    from jaxlm.data.tokenizer import load_tokenizer

    src = cfg.train.init_from
    src_cfg = source_config(src)
    check_same_model(cfg.model, src_cfg.model, src)
    tok_path = source_tokenizer_path(src, src_cfg)
    if cfg.data.tokenizer is None:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tok_path))
    if load_tokenizer(cfg.data.tokenizer).sha256 != load_tokenizer(tok_path).sha256:
        raise ConfigError(
            f"data.tokenizer={cfg.data.tokenizer!r} is not the tokenizer of the checkpoint "
            f"'{src}' ({tok_path}); leave data.tokenizer unset to use the checkpoint's."
        )
    return cfg


def load_init_params(cfg: RunConfig, shardings: Any) -> Any:
    """The parameters of `train.init_from`, placed into the run's parameter shardings."""
    import jax

    from jaxlm.evaluate import load_run

    run = load_run(cfg.train.init_from)
    host = jax.device_get(run.params)
    if jax.tree.structure(host) != jax.tree.structure(shardings):
        raise ConfigError(
            f"The parameters in '{cfg.train.init_from}' are laid out differently from this "
            f"model's; start from a checkpoint of the same model config."
        )
    _log(f"Initialised from '{cfg.train.init_from}' (its step {run.step}); fresh optimizer.")
    # Every process supplies the shards it holds, so this also works across hosts.
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), host, shardings
    )


def lm_finetune_config(checkpoint: str, config_path: str | None, overrides: list[str]) -> RunConfig:
    """A run config for fine-tuning `checkpoint`'s LM: its model and seq_len unless overridden."""
    src_cfg = source_config(checkpoint)
    raw: dict[str, Any] = {}
    if config_path is not None:
        if not Path(config_path).is_file():
            raise ConfigError(f"Config file '{config_path}' does not exist; pass a YAML file.")
        try:
            raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise ConfigError(f"Config file '{config_path}' is not valid YAML; fix it.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"Config file '{config_path}' must hold a mapping of sections.")
    for section in ("model", "data"):
        if not isinstance(raw.get(section) or {}, dict):
            raise ConfigError(f"Config section '{section}' must be a mapping of keys to values.")
    model = {**dataclasses.asdict(src_cfg.model), **(raw.get("model") or {})}
    data = {"seq_len": src_cfg.data.seq_len, **(raw.get("data") or {})}
    raw = {**raw, "model": model, "data": data}
    for section, kv in config_lib.parse_overrides(
        [*overrides, f"train.init_from={Path(checkpoint).absolute()}"]
    ).items():
        raw[section] = {**(raw.get(section) or {}), **kv}
    cfg = config_lib.resolve(config_lib.from_dict(raw))
    config_lib.validate(cfg)
    return cfg


# ------------------------------------------------------------- classification


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
    from jaxlm import finetune_data as fd
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

    from jaxlm import finetune_train

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

    from jaxlm import finetune_data as fd

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
