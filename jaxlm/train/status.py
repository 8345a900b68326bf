"""What a run directory says about its run: progress, losses, speed, restarts and goodput.

Read-only: everything comes from metrics.jsonl (its train/eval/perf records and one
`session` record per start of `jaxlm train`, plus a `session_end` record when it ended
cleanly), config.yaml and the checkpoint directory names.

Goodput is the share of wall-clock time, over every session of the run, spent on training
steps that count toward the final model. The rest is set-up (data, restore), compilation,
evaluation, starting checkpoint saves, steps recomputed after a crash (done, then lost with
the process), and the time between a crash and the restart. A session killed without a
`session_end` record is accounted from its surviving records: its wall time runs until the
next session started, its productive time is the steps it kept times its step time.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from jaxlm.config import load_config
from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path, read_text


def read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as dicts (a torn last line is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in read_text(path).splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def last_train_step(path: Path) -> int:
    """The highest step with a train record in metrics.jsonl (0 if none)."""
    steps = [int(r["step"]) for r in read_records(path) if r.get("split") == "train"]
    return max(steps, default=0)


def _step_seconds(perf: list[dict[str, Any]], tokens_per_step: int) -> float | None:
    rates = [r["tokens_per_sec"] for r in perf[1:] or perf if r.get("tokens_per_sec")]
    return tokens_per_step / float(np.median(rates)) if rates else None


def _account(
    sessions: list[dict[str, Any]], perf: list[dict[str, Any]], final: int, tokens_per_step: int
) -> dict[str, float]:
    """Wall, productive and lost seconds summed over the sessions."""
    acc = dict.fromkeys(("wall_s", "productive_s", "setup_s", "compile_s", "eval_s"), 0.0)
    acc.update(dict.fromkeys(("checkpoint_s", "recomputed_s", "down_s"), 0.0))
    for i, s in enumerate(sessions):
        nxt = sessions[i + 1] if i + 1 < len(sessions) else None
        began = s["time"] - s.get("setup_s", 0.0)
        kept = (nxt["start_step"] if nxt else final) - s["start_step"]
        end = s.get("end")
        if end is not None:
            step_s = end["train_s"] / end["steps"] if end.get("steps") else 0.0
            acc["wall_s"] += end["wall_s"]
            acc["compile_s"] += end.get("compile_s", 0.0)
            acc["eval_s"] += end.get("eval_s", 0.0)
            acc["checkpoint_s"] += end.get("checkpoint_s", 0.0)
            acc["productive_s"] += max(kept, 0) * step_s
            acc["recomputed_s"] += (end["steps"] - max(kept, 0)) * step_s
        else:  # killed: accounted from its surviving records
            mine = [
                r for r in perf if began <= r["time"] and (nxt is None or r["time"] < nxt["time"])
            ]
            stop = (
                (nxt["time"] - nxt.get("setup_s", 0.0))
                if nxt
                else max([r["time"] for r in mine], default=s["time"])
            )
            step_s = _step_seconds(mine, tokens_per_step) or 0.0
            productive = max(kept, 0) * step_s
            redone = (nxt.get("recomputed_steps", 0.0) if nxt else 0.0) * step_s
            acc["wall_s"] += stop - began
            acc["productive_s"] += productive
            acc["recomputed_s"] += redone
            rest = stop - began - s.get("setup_s", 0.0) - productive - redone
            acc["down_s"] += max(rest, 0.0)  # its compilation, evaluation, and the outage
        acc["setup_s"] += s.get("setup_s", 0.0)
    return acc


def run_status(workdir: str | Path) -> dict[str, Any]:
    """A summary of the run in `workdir` (see the module docstring)."""
    workdir = as_path(workdir, "RUN_DIR")
    if not (workdir / "config.yaml").is_file():
        raise ConfigError(f"'{workdir}' holds no config.yaml; give the --workdir of a jaxlm run.")
    cfg = load_config(workdir / "config.yaml")
    records = read_records(workdir / "metrics.jsonl")
    by_split: dict[str, list[dict[str, Any]]] = {}
    sessions: list[dict[str, Any]] = []
    for r in records:
        if r.get("split") == "session":
            sessions.append(dict(r))
        elif r.get("split") == "session_end" and sessions:
            sessions[-1]["end"] = r
        else:
            by_split.setdefault(r.get("split", ""), []).append(r)
    train, evals, perf = (by_split.get(k, []) for k in ("train", "eval", "perf"))
    final = max((int(r["step"]) for r in train), default=0)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    ckpt = workdir / "checkpoints"
    rates = [r["tokens_per_sec"] for r in perf if r.get("tokens_per_sec")]
    out: dict[str, Any] = {
        "workdir": str(workdir),
        "step": final,
        "steps": cfg.train.steps,
        "tokens": final * tokens_per_step,
        "first_loss": train[0].get("loss") if train else None,
        "last_loss": train[-1].get("loss") if train else None,
        "last_eval_loss": evals[-1].get("loss") if evals else None,
        "median_tokens_per_sec": float(np.median(rates)) if rates else None,
        "checkpoints": sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
        if ckpt.is_dir()
        else [],
        "sessions": len(sessions),
        "restarts": max(len(sessions) - 1, 0),
        "recomputed_steps": sum(int(s.get("recomputed_steps", 0)) for s in sessions),
        "killed_sessions": sum(1 for s in sessions[:-1] if "end" not in s),
    }
    if sessions:
        acc = _account(sessions, perf, final, tokens_per_step)
        out.update({k: round(v, 3) for k, v in acc.items()})
        out["goodput"] = acc["productive_s"] / acc["wall_s"] if acc["wall_s"] > 0 else math.nan
    return out


def format_status(s: dict[str, Any]) -> str:
    """The summary as aligned text lines."""

    def num(v, fmt="{:,.4g}"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    lines = [
        f"run                 {s['workdir']}",
        f"step                {s['step']:,} of {s['steps']:,} ({s['tokens']:,} tokens)",
        f"loss                first {num(s['first_loss'])}, last {num(s['last_loss'])}, "
        f"last eval {num(s['last_eval_loss'])}",
        f"throughput          {num(s['median_tokens_per_sec'], '{:,.0f}')} tokens/s (median)",
        f"checkpoints         {', '.join(map(str, s['checkpoints'])) or 'none'}",
        f"sessions            {s['sessions']} ({s['restarts']} restarts, "
        f"{s['killed_sessions']} killed, {s['recomputed_steps']} steps recomputed)",
    ]
    if "goodput" in s:
        lost = ("setup_s", "compile_s", "eval_s", "checkpoint_s", "recomputed_s", "down_s")
        lines.append(
            f"goodput             {num(s['goodput'], '{:.1%}')} of {s['wall_s']:,.1f} s wall "
            f"clock productive"
        )
        lines.append("time lost           " + ", ".join(f"{k[:-2]} {s[k]:,.1f} s" for k in lost))
    return "\n".join(lines)
