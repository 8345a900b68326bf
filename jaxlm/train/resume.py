"""Resuming a run: which config changes may resume, what changed, and rewinding the logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.errors import ConfigError

# Keys that fix the shapes or meaning of the saved state/data; everything else may change.
RESUME_CRITICAL = (
    "model",
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
    now = config_lib.to_dict(cfg)
    for key in RESUME_CRITICAL:
        section, _, name = key.partition(".")
        old_v, new_v = saved.get(section, {}), now[section]
        if name:
            if name not in old_v:  # a key newer than the checkpoint: nothing to compare
                continue
            old_v, new_v = old_v.get(name), new_v[name]
        else:  # fields added after the checkpoint was written keep their default meaning
            new_v = {k: v for k, v in new_v.items() if k in old_v}
        if old_v != new_v:
            if not name:  # name the first differing model field
                keys = sorted(set(old_v) | set(new_v))
                k = next(k for k in keys if old_v.get(k) != new_v.get(k))
                key, old_v, new_v = f"model.{k}", old_v.get(k), new_v.get(k)
            raise ConfigError(
                f"{key}={new_v!r} differs from the checkpoint in '{workdir}' ({old_v!r}), so "
                f"the run can't resume; restore the old value or use a new --workdir."
            )


def changed_settings(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """'section.key: old -> new' for every setting that differs from the checkpoint's."""
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
