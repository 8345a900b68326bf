"""Do the CPU speed tricks help a TPU step? Ahead-of-time compiles with and without them.

For each job the train step is compiled for a described TPU slice (libtpu, no TPU needed)
twice: with the model code jaxlm uses on TPU (plain per-kernel matmuls, no RoPE barrier)
and with the CPU tricks switched on (jaxlm.models.backend.TRICKS["cpu"]). Printed and
written: XLA's per-chip temporaries and peak, and the bytes its cost analysis says the
program touches (that analysis counts a scanned loop body once, so with scan_layers it is
one layer's traffic plus the rest of the step, not a whole step's).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import jax

from jaxlm.bench import plan as plan_lib
from jaxlm.bench import report
from jaxlm.config import load_config
from jaxlm.models import backend

ROOT = Path(__file__).resolve().parents[1]
# (name, topology, config, overrides): Llama-2-7B on v5p-32 and a 1.1B Llama on v5e-16,
# FSDP over every chip, bfloat16, full remat, scanned layers.
JOBS = (
    ("Llama-2-7B, v5p-32", "v5p:2x2x4", "configs/llama2-7b.yaml", []),
    (
        "1.1B Llama, v5e-16",
        "v5e:4x4",
        "configs/llama2-7b.yaml",
        ["model.d_model=2048", "model.n_layers=22", "model.n_heads=32", "model.n_kv_heads=4",
         "model.d_ff=5632", "data.seq_len=2048", "model.max_seq_len=2048"],
    ),
)  # fmt: skip
GIB = 1024**3


def measure(name: str, topology: str, config: str, overrides: list[str], attention: str):
    cfg = load_config(str(ROOT / config), [*overrides, f"model.attention={attention}"])
    devices = report.tpu_devices(topology, 1)
    rows = []
    for label, tricks in (("TPU default (no CPU tricks)", frozenset()), ("CPU tricks on", None)):
        backend.TRICKS["tpu"] = backend.TRICKS["cpu"] if tricks is None else tricks
        p = plan_lib.make_plan(cfg, devices, plan_lib.default_device_memory(topology))
        rows.append(
            {
                "job": name,
                "attention": p.attention,
                "model code": label,
                "temp GiB": round(p.temp_bytes / GIB, 2),
                "peak GiB": round(p.peak_bytes / GIB, 2),
                "bytes accessed GiB": None
                if p.bytes_accessed is None
                else round(p.bytes_accessed / GIB, 2),
            }
        )
        print(rows[-1], flush=True)
    backend.TRICKS["tpu"] = frozenset()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", default="auto", help="model.attention for every job")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "tpu-tricks"), help="path stem")
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    rows = [r for job in JOBS for r in measure(*job, args.attention)]
    columns = [(k, k, "s" if k in ("job", "attention", "model code") else "") for k in rows[0]]
    table = report.table(columns, rows, right=[k for k in rows[0] if "GiB" in k])
    env = {
        **{k: v for k, v in report.environment().items() if k != "pallas_mode"},
        "compiled for": ", ".join(f"{name} ({topology})" for name, topology, *_ in JOBS),
        "libtpu": importlib.metadata.version("libtpu"),
    }
    text = "\n".join([table, "", *(f"- {k}: {v}" for k, v in env.items())])
    print(text)
    Path(args.out + ".md").write_text(text + "\n")
    Path(args.out + ".json").write_text(json.dumps({"rows": rows, "environment": env}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
