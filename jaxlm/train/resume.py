"""Resuming a run: which config and data changes may resume, what changed, and rewinding
the logs."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.data import mixture
from jaxlm.data.shards import MANIFEST
from jaxlm.data.tokenizer_base import Tokenizer
from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path, copy_file, write_bytes_atomic

logger = logging.getLogger(__name__)

# The key under which a checkpoint's saved config carries `data_identity` (next to the config
# sections, which it never collides with).
IDENTITY_KEY = "data_identity"

# Keys outside the model that fix the shapes or meaning of the saved state and data position.
# The model's own rule is its fields' marking: architecture fields must match, runtime ones
# (remat, attention, dtype, ...) may change; see jaxlm.config.schema.
RESUME_CRITICAL = (
    "data.seq_len",
    "data.corpus",
    "data.streaming",
    "data.tokenizer",
    "data.seed",
    "data.validation_fraction",
    "data.doc_chars",
    "train.batch_size",
)


def check_resumable(saved: dict[str, Any], cfg: RunConfig, workdir: Path) -> None:
    """Refuse to resume a run whose checkpoint was written with an incompatible config."""
    runtime, layout = config_lib.runtime_fields(), config_lib.layout_fields()
    for name, (old_v, new_v) in config_lib.model_changes(saved.get("model", {}), cfg.model).items():
        if name in layout:  # the saved params and optimizer state keep the checkpoint's tree
            if name == "lora_targets" and not (
                cfg.model.lora_rank or saved.get("model", {}).get("lora_rank")
            ):
                continue  # no adapters either way: the targets name nothing
            raise ConfigError(
                f"model.{name}={new_v!r} differs from the checkpoint in '{workdir}' ({old_v!r}), "
                f"and a resume can't restack the layers or add or drop the LoRA adapters of its "
                f"saved train state; restore the old value, or fine-tune from it in a new "
                f"--workdir with train.init_from={workdir}."
            )
        if name not in runtime:
            _refuse(f"model.{name}", old_v, new_v, workdir)
    now = config_lib.to_dict(cfg)
    for key in RESUME_CRITICAL:
        section, _, name = key.partition(".")
        old_section = saved.get(section, {})
        if name in old_section and old_section[name] != now[section][name]:
            _refuse(key, old_section[name], now[section][name], workdir)


def _refuse(key: str, old_v: Any, new_v: Any, workdir: Path) -> None:
    raise ConfigError(
        f"{key}={new_v!r} differs from the checkpoint in '{workdir}' ({old_v!r}), so the run "
        f"can't resume; restore the old value or use a new --workdir."
    )


def changed_settings(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'section.key: old -> new' for every setting that differs from the checkpoint's.

    After `check_resumable` these are the accepted changes: runtime model fields (remat,
    attention, dtype, ...) and settings of the loop such as train.steps.
    """
    now = config_lib.to_dict(cfg)
    out = []
    for section, values in now.items():
        old_section = saved.get(section, {})
        for key, new_v in values.items():
            if key in old_section and old_section[key] != new_v:
                out.append(f"{section}.{key}: {old_section[key]!r} -> {new_v!r}")
    return out


def rewind_metrics(path: Path, step: int) -> int:
    """Drop records logged after `step` (and any torn last line); returns how many went.

    A crash loses the steps since the last checkpoint, and the resumed run logs them again
    (bitwise the same values), so the file keeps one record per step and split.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ok = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False  # a line torn by the crash
        if ok:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_bytes_atomic(path, "".join(kept).encode("utf-8"))
    return dropped


def keep_tokenizer(path: str, workdir: Path) -> None:
    """Copy a SentencePiece model from elsewhere (data.tokenizer, prepared data) into the run,
    where eval, generate and export look for it."""
    if str(path).endswith(".model") and not (workdir / "tokenizer.model").exists():
        copy_file(path, workdir / "tokenizer.model")


def data_identity(cfg: RunConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """What a run trains on, by content: its tokenizer's SHA-256 and a corpus fingerprint.

    Text corpora are fingerprinted by their file list with sizes and modification times
    (reading every byte would cost as much as the tokenization); prepared data by its
    manifests, which already hold every shard's hash.
    """
    prepared = mixture.prepared_paths(cfg)
    h, files, size = hashlib.sha256(), 0, 0
    if prepared:
        for path, _ in prepared:
            h.update(hashlib.sha256((as_path(path) / MANIFEST).read_bytes()).digest())
            files += 1
        kind = "prepared"
    elif cfg.data.corpus == "builtin":
        kind = "builtin"  # package data: it changes only with jaxlm itself
    else:
        kind = "text"
        for path in _text_files(cfg.data.corpus):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
            files, size = files + 1, size + st.st_size
    corpus = {"kind": kind, "files": files, "bytes": size, "sha256": h.hexdigest()}
    return {"tokenizer": tokenizer.path, "tokenizer_sha256": tokenizer.sha256, "corpus": corpus}


def _text_files(pattern: str) -> list[str]:
    """The files `data.corpus` names, as the text reader finds them."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    return [p for p in paths if os.path.isfile(p)]


def data_change(saved: dict[str, Any] | None, now: dict[str, Any], cfg: RunConfig) -> str | None:
    """What differs between the data a checkpoint was trained on and the run's now, or None.

    A checkpoint written before jaxlm recorded its data (`saved` None) is taken on trust.
    """
    if not saved:
        return None
    old_tok, new_tok = saved.get("tokenizer_sha256"), now["tokenizer_sha256"]
    if old_tok and old_tok != new_tok:
        return (
            f"the tokenizer {now['tokenizer']} (sha256 {new_tok[:12]}…) is not the one the "
            f"checkpoint was trained with (sha256 {old_tok[:12]}…), so its token ids would "
            f"stand for other text"
        )
    old, new = saved.get("corpus") or {}, now["corpus"]
    if not old.get("sha256") or old["sha256"] == new["sha256"]:
        return None
    if new["kind"] == "text" and old.get("kind") == "text":
        return (
            f"the files of data.corpus={cfg.data.corpus!r} changed since the checkpoint was "
            f"trained on them ({old.get('files')} of {old.get('bytes')} bytes then, "
            f"{new['files']} of {new['bytes']} bytes now, or other modification times)"
        )
    return "the manifest of the prepared data changed since the checkpoint was trained on it"


def check_same_data(
    saved: dict[str, Any], now: dict[str, Any], cfg: RunConfig, workdir: Path, allow: bool
) -> None:
    """Refuse to resume on other data than the checkpoint's, unless `allow` (then warn).

    Process 0 judges and the others follow, since each host may see its own copy of a file.
    """
    change = data_change(saved.get(IDENTITY_KEY), now, cfg) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        changed = int(multihost_utils.broadcast_one_to_all(np.int32(change is not None)))
        if changed and change is None and not allow:
            raise ConfigError(
                f"Process 0 found the data changed since the checkpoint in '{workdir}' (its "
                f"own error says how); restore it, or pass --allow-data-change to every process."
            )
    if change is None:
        return
    if not allow:
        raise ConfigError(
            f"In '{workdir}', {change}; restore the original, or pass --allow-data-change to "
            f"resume on the new data anyway."
        )
    logger.warning("Resuming on changed data (--allow-data-change): %s.", change)
