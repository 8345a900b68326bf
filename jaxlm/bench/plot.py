"""Loss curves of one or several runs from their metrics.jsonl, as one PNG (matplotlib); one
run's step-time breakdown and goodput; and a mixture of experts' load per expert over steps."""

from __future__ import annotations

import json
import math
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


def read_moe_load(run_dir: str | Path) -> tuple[list[int], list[list[float]]]:
    """(steps, shares[step][expert]) from the moe_load_<e> keys of a run's train records."""
    run_status(run_dir)  # refuses a directory that is no run
    steps, shares = [], []
    for rec in read_records(Path(run_dir) / "metrics.jsonl"):
        n = sum(1 for k in rec if k.startswith("moe_load_"))
        if rec.get("split") == "train" and n:
            steps.append(int(rec["step"]))
            shares.append([float(rec.get(f"moe_load_{e}", math.nan)) for e in range(n)])
    if not steps:
        raise ConfigError(
            f"'{run_dir}' has no moe_load_* records in its train metrics; plot a run of a "
            f"mixture-of-experts model (model.moe_experts > 0) trained with this version."
        )
    return steps, shares


def plot_moe_load(run_dir: str | Path, output: str | Path) -> Path:
    """Each expert's share of the token assignments (mean over MoE layers) at every logged
    step, as a heatmap: top, coloured by the share relative to a uniform 1/X; bottom, the
    shares as lines."""
    steps, shares = read_moe_load(run_dir)
    plt = pyplot()
    if plt is None:
        raise ConfigError(
            "jaxlm plot needs matplotlib; install it with pip install 'jaxlm[bench]'."
        )
    n = max(len(row) for row in shares)
    grid_XxS = [[row[e] * n if e < len(row) else math.nan for row in shares] for e in range(n)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    peak = max((v for col in grid_XxS for v in col if math.isfinite(v)), default=1.0)
    # White at the uniform share, blue down to an idle expert, red up to the busiest one.
    norm = plt.matplotlib.colors.TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(peak, 1.5))
    image = top.imshow(
        grid_XxS,
        aspect="auto",
        interpolation="nearest",
        cmap="coolwarm",
        norm=norm,
        extent=(steps[0], steps[-1], n - 0.5, -0.5),
    )
    fig.colorbar(image, ax=top, label="share x experts (1 = uniform)")
    top.set_ylabel("expert")
    top.set_yticks(range(n))
    top.set_title(f"{Path(run_dir).resolve().name}: load per expert (mean over MoE layers)")
    for e in range(n):
        bottom.plot(steps, [v / n for v in grid_XxS[e]], lw=1, color=f"C{e % 10}", label=str(e))
    bottom.axhline(1.0 / n, color="k", ls="--", lw=0.8, label="uniform")
    bottom.set_xlabel("step")
    bottom.set_ylabel("share of assignments")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7, ncol=min(n + 1, 10), title="expert", title_fontsize=7)
    return save_figure(fig, output)
