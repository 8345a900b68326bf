"""The metrics writer of a run: one JSON record per line in metrics.jsonl, plus TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends metrics to RUN_DIR/metrics.jsonl and TensorBoard event files.

    Only process 0 writes; on other processes every call is a no-op.
    """

    def __init__(self, workdir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Record scalars for one step under `prefix/` (train, eval, ...)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if _finite_number(v)}
        record = {"step": int(step), "split": prefix, "time": time.time(), **clean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
