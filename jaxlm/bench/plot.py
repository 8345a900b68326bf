"""Loss curves of one or several runs from their metrics.jsonl, as one PNG (matplotlib)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from jaxlm.bench.report import pyplot, save_figure
from jaxlm.errors import ConfigError


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
