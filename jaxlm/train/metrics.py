"""The metrics of a run: one JSON record per line in metrics.jsonl, plus the trackers.

metrics.jsonl is always written (status, plots and resume read it). Trackers receive the
same scalars: TensorBoard event files (tensorboardX's writer) unless
`logging.tensorboard=false`, and Weights & Biases when `logging.wandb_project` is set (its
own client; `logging.wandb_mode=offline` needs no network). A W&B run keeps one id across
restarts of the jaxlm run (saved in WORKDIR/wandb_run_id), so a resumed job continues the
same W&B run. The resolved config and jaxlm's version and commit are logged with it.

In a bucket (gs://, s3://), where nothing can be appended to, metrics.jsonl and the event
file are put whole again at each write (metrics.jsonl) or flush (events): every record
already written survives a crash, at the cost of re-sending a file that grows by one line
per logged step.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any, Protocol

from tensorboardX import SummaryWriter
from tensorboardX.record_writer import register_writer_factory

from jaxlm.config import LoggingConfig
from jaxlm.config.version import version_info
from jaxlm.paths import Path, append_text, as_path, is_remote

try:  # the optional extra: jaxlm[wandb] (config validation refuses a project without it)
    import wandb
except ImportError:
    wandb = None

WANDB_ID_FILE = "wandb_run_id"


class Tracker(Protocol):
    """Somewhere scalars go, step by step."""

    def write(self, step: int, scalars: dict[str, float], prefix: str) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars as `prefix/name` in TensorBoard event files."""

    def __init__(self, directory: Path):
        self._tb = SummaryWriter(str(directory))

    def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        self._tb.close()


class WandbTracker:
    """Scalars as `prefix/name` in a Weights & Biases run, resumed across restarts."""

    def __init__(self, workdir: Path, project: str, mode: str, config: dict[str, Any]):
        id_file = workdir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=project,
            id=run_id,
            resume="allow",
            mode=mode,
            dir=None if is_remote(workdir) else str(workdir),  # W&B's files stay local
            name=workdir.name,
            config={**config, "jaxlm": version_info()},
        )

    def write(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        self._run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Appends metrics to RUN_DIR/metrics.jsonl and hands them to the trackers.

    Only process 0 writes; on other processes every call is a no-op.
    """

    def __init__(
        self,
        workdir: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        trackers: list[Tracker] | None = None,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._trackers: list[Tracker] = []
        if not enabled:
            return
        workdir = as_path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._remote: tuple[Path, list[str]] | None = None
        if is_remote(workdir):  # an object: rewritten whole from the lines kept here
            path = workdir / "metrics.jsonl"
            self._remote = (path, [path.read_text(encoding="utf-8")] if path.exists() else [])
        else:
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            self._trackers.append(TensorBoardTracker(workdir / "tensorboard"))
        self._trackers += trackers or []

    @classmethod
    def for_run(
        cls, workdir: Path, cfg: LoggingConfig, config: dict[str, Any], enabled: bool
    ) -> MetricsWriter:
        """The writer a training run uses: its `logging.*` trackers, `config` logged."""
        trackers: list[Tracker] = []
        if enabled and cfg.wandb_project:
            trackers.append(WandbTracker(workdir, cfg.wandb_project, cfg.wandb_mode, config))
        return cls(workdir, enabled, tensorboard=cfg.tensorboard, trackers=trackers)

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """Record scalars for one step under `prefix/` (train, eval, ...)."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if _finite_number(v)}
        record = {"step": int(step), "split": prefix, "time": time.time(), **clean}
        if self._remote is not None:
            append_text(self._remote[0], json.dumps(record) + "\n", whole=self._remote[1])
        else:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        for tracker in self._trackers:
            tracker.write(int(step), clean, prefix)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


class _ObjectEventFile:
    """A TensorBoard event file in a bucket: held in memory, put whole at each flush."""

    def __init__(self, path: str):
        self._path = as_path(path)
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        self._path.write_bytes(bytes(self._data))

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    """tensorboardX's writer factory for gs:// and s3:// through jaxlm's paths."""

    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # buckets have no directories


for _scheme in ("gs", "s3"):
    register_writer_factory(_scheme, _ObjectEventFiles())


def _finite_number(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
