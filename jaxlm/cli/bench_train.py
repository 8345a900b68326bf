"""`jaxlm bench train`: step time, tokens/s, TFLOP/s, MFU, compile time and memory of a config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxlm.cli.common import add_config_args, check_outputs, csv, formatter
from jaxlm.config import load_config
from jaxlm.errors import ConfigError


def register_bench(what) -> None:
    """`jaxlm bench train --config FILE [overrides]`; --sweep takes comma-separated lists."""
    p = what.add_parser(
        "train",
        formatter_class=formatter,
        help="time the train step of a config: tokens/s, TFLOP/s, MFU, compile time, memory",
        description="Compile the train step once, run warm-up steps, then time N steps on a "
        "synthetic batch. MFU is against the matmul peak measured in the same process right "
        "before the timed steps (CPU) or the vendor bf16 peak (GPU/TPU).",
    )
    add_config_args(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed steps first")
    p.add_argument("--json", metavar="FILE", help="write the result(s) as JSON")
    p.add_argument(
        "--profile", metavar="DIR", help="jax.profiler trace of the timed steps into DIR"
    )
    p.add_argument("--table", metavar="FILE", help="append a row per result to this markdown table")
    p.add_argument("--sweep", action="store_true", help="run every combination of the lists below")
    p.add_argument(
        "--d-model", type=csv(int), metavar="LIST", help="sweep: widths (64-wide heads, d_ff 4d)"
    )
    p.add_argument("--seq", type=csv(int), metavar="LIST", help="sweep: sequence lengths")
    p.add_argument("--batch", type=csv(int), metavar="LIST", help="sweep: global batch sizes")
    p.add_argument("--plot", metavar="FILE", help="sweep: PNG of tokens/s and MFU vs model size")
    p.set_defaults(run=cmd_bench_train)


def cmd_bench_train(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(
            f"--steps {args.steps} / --warmup {args.warmup}: use steps >= 1, warmup >= 0."
        )
    check_outputs(args, "json", "table", "plot")
    from jaxlm.bench import report  # imports JAX: keep `--help` fast
    from jaxlm.bench import train as bench_train

    sweeping = args.sweep or any(x is not None for x in (args.d_model, args.seq, args.batch))
    variants = bench_train.sweep_overrides(args.d_model, args.seq, args.batch) if sweeping else [[]]
    configs = [load_config(args.config, list(args.overrides) + ov) for ov in variants]
    name = Path(args.config).stem if args.config else "defaults"
    results = []
    for cfg, ov in zip(configs, variants, strict=True):
        label = " ".join([name, *ov]) if ov else name
        r = bench_train.bench_train(
            cfg, steps=args.steps, warmup=args.warmup, name=label, profile_dir=args.profile
        )
        print(bench_train.summary_line(r), file=sys.stderr, flush=True)
        results.append(r)
    out = results if sweeping else results[0]
    print(json.dumps(out if sweeping else _brief(out)))
    if args.json:
        report.write_json(args.json, out)
    if args.table:
        report.append_table(
            args.table, bench_train.TABLE_PREAMBLE, map(bench_train.table_row, results)
        )
    if args.plot and not bench_train.write_sweep_plot(args.plot, results):
        print(
            "jaxlm bench train: matplotlib is not installed, so no plot was written "
            "(pip install 'jaxlm[bench]')",
            file=sys.stderr,
        )
    return 0


def _brief(r: dict) -> dict:
    """The headline numbers of one result (the JSON file holds everything)."""
    keys = ("tokens_per_sec", "tflops_per_sec_per_device", "mfu", "peak_flops_per_device")
    return {k: r[k] for k in ("config", "median_step_s", *keys, "compile_s")}
