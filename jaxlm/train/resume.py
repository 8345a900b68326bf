"""Resuming a run: which config changes may resume, what changed, and rewinding the logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.errors import ConfigError

# Keys outside the model that fix the shapes or meaning of the saved state and data position.
# The model's own rule is its fields' marking: architecture fields must match, runtime ones
# (remat, attention, dtype, ...) may change; see jaxlm.config.schema.
RESUME_CRITICAL = (
    "data.seq_len",
    "data.corpus",
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
            raise ConfigError(
                f"model.{name}={new_v!r} differs from the checkpoint in '{workdir}' ({old_v!r}), "
                f"and a resume can't restack the layers of its saved train state; restore the "
                f"old value, or fine-tune from it in a new --workdir with "
                f"train.init_from={workdir}."
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
