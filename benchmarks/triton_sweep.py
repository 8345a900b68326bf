"""Sweep the Pallas flash kernel's Triton block sizes on a GPU; print a table and the best.

Run by benchmarks/gpu.sh. Every candidate is timed forward+backward on one causal bfloat16
shape (default B=1, H=16, S=4096, D=128, the size the GPU target is stated at) with the
`jaxlm bench attention` harness, so its numbers are comparable with that table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import jax

from jaxlm.bench import attention as bench
from jaxlm.kernels.flash_attention import BlockSizes

# Forward (block_q, block_k) x backward (block_q_bwd, block_k_bwd) x warps: 18 candidates.
FORWARD = ((64, 64), (128, 64), (128, 128))
BACKWARD = ((32, 64), (64, 64), (64, 128))
WARPS = (4, 8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write every row here")
    args = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("triton_sweep.py needs a GPU (JAX sees none).", file=sys.stderr)
        return 1
    case = bench.Case(
        "pallas", "fwd+bwd", 1, args.heads, args.heads, args.seq, args.head_dim, True, "bfloat16"
    )
    rows = []
    for (bq, bk), (bqb, bkb), warps in itertools.product(FORWARD, BACKWARD, WARPS):
        blocks = BlockSizes(bq, bk, bqb, bkb, num_warps=warps, num_stages=2)
        row = bench.measure(case, iters=args.iters, check=False, blocks=blocks)
        row["blocks"] = f"{bq}x{bk} bwd {bqb}x{bkb} warps {warps}"
        rows.append(row)
        ms = row.get("median_ms")
        print(
            f"{row['blocks']:32s} {'failed: ' + row['skipped'] if ms is None else f'{ms:.3f} ms'}"
        )
    timed = [r for r in rows if r.get("median_ms") is not None]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not timed:
        print("no block size compiled", file=sys.stderr)
        return 1
    best = min(timed, key=lambda r: r["median_ms"])
    print(f"best: {best['blocks']}: {best['median_ms']:.3f} ms, {best['tflops']:.1f} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
