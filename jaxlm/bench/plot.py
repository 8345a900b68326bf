"""Loss curves of one or several runs from their metrics.jsonl, as one PNG (matplotlib); and
one run's step-time breakdown and goodput."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxlm.bench.report import pyplot, save_figure
from jaxlm.errors import ConfigError
from jaxlm.train.status import read_records, run_status
from jaxlm.train.timing import PHASES


@dataclass
class Curves:
    """A run's train and eval loss by step, and the tokens one step consumes (if known)."""

    name: str
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_step: int | None = None


def read_run(run_dir: str | Path) -> Curves:
    """Parse RUN_DIR/metrics.jsonl (and config.yaml for tokens per step)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass a directory `jaxlm train` wrote.")
    curves = Curves(run_dir.resolve().name)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a crash: skip it
            continue
        if not isinstance(rec, dict) or "loss" not in rec or "step" not in rec:
            continue
        split = rec.get("split", "train")
        if split in ("train", "eval"):
            getattr(curves, split).append((int(rec["step"]), float(rec["loss"])))
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
        try:
            curves.tokens_per_step = int(cfg["train"]["batch_size"]) * int(cfg["data"]["seq_len"])
        except (KeyError, TypeError, ValueError):
            pass
    curves.train.sort()
    curves.eval.sort()
    return curves


def plot_runs(run_dirs: list[str | Path], output: str | Path, x: str = "steps") -> Path:
    """Draw train (thin) and eval (markers) loss of every run against steps or tokens."""
    if x not in ("steps", "tokens"):
        raise ConfigError(f"--x {x} is not supported; use steps or tokens.")
    runs = [read_run(d) for d in run_dirs]
    if x == "tokens":
        missing = [r.name for r in runs if not r.tokens_per_step]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)}: no config.yaml with train.batch_size and data.seq_len, "
                f"so tokens are unknown; plot with --x steps."
            )
    plt = pyplot()
    if plt is None:
        raise ConfigError(
            "jaxlm plot needs matplotlib; install it with pip install 'jaxlm[bench]'."
        )
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        scale = run.tokens_per_step if x == "tokens" else 1
        if run.train:
            steps, losses = zip(*run.train, strict=True)
            ax.plot(
                [s * scale for s in steps],
                losses,
                color=color,
                lw=1,
                alpha=0.8,
                label=f"{run.name} train",
            )
        if run.eval:
            steps, losses = zip(*run.eval, strict=True)
            ax.plot(
                [s * scale for s in steps],
                losses,
                "o--",
                color=color,
                ms=4,
                label=f"{run.name} eval",
            )
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, output)


LOST = ("setup_s", "compile_s", "eval_s", "checkpoint_s", "recomputed_s", "down_s")


def plot_breakdown(run_dir: str | Path, output: str | Path) -> Path:
    """Left: seconds per step in each phase, per logging window. Right: where the run's
    wall-clock time went (goodput and what was lost), over all its sessions."""
    status = run_status(run_dir)  # refuses a directory that is no run
    perf = [r for r in read_records(Path(run_dir) / "metrics.jsonl") if r.get("split") == "perf"]
    if not perf or "goodput" not in status:
        raise ConfigError(
            f"'{run_dir}' has no step-time records (written by jaxlm train from this version "
            f"on); train it further, then plot again."
        )
    plt = pyplot()
    if plt is None:
        raise ConfigError(
            "jaxlm plot needs matplotlib; install it with pip install 'jaxlm[bench]'."
        )
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    steps = [r["step"] for r in perf]
    widths = [max(b - a, 1) for a, b in zip([0, *steps[:-1]], steps, strict=True)]
    bottom = [0.0] * len(perf)
    for i, phase in enumerate(PHASES):
        per_step = [r.get(f"{phase}_s", 0.0) / w for r, w in zip(perf, widths, strict=True)]
        left.bar(range(len(perf)), per_step, bottom=bottom, color=f"C{i}", label=phase)
        bottom = [b + v for b, v in zip(bottom, per_step, strict=True)]
    left.set_xticks(range(len(perf)), [str(s) for s in steps], fontsize=7, rotation=90)
    left.set_xlabel("logged step")
    left.set_ylabel("seconds per step")
    left.set_title("host time per step, by phase")
    left.legend(fontsize=8)
    parts = {"productive": status["productive_s"]} | {k[:-2]: status[k] for k in LOST}
    right.barh(list(parts), list(parts.values()), color=["C2"] + ["C7"] * len(LOST))
    right.invert_yaxis()
    right.set_xlabel("seconds (all sessions)")
    right.set_title(
        f"goodput {status['goodput']:.1%} of {status['wall_s']:.0f} s, "
        f"{status['sessions']} session(s)"
    )
    fig.tight_layout()
    return save_figure(fig, output)
