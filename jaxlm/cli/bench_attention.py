"""`jaxlm bench attention`: Pallas flash vs XLA vs cuDNN, forward and backward."""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm.cli.common import check_outputs, csv, formatter
from jaxlm.errors import ConfigError


def register_bench(what) -> None:
    """`jaxlm bench attention`: every sweep option takes a comma-separated list."""
    a = what.add_parser(
        "attention",
        formatter_class=formatter,
        help="sweep attention implementations: ms, TFLOP/s, error, compile time, memory",
        description="Sweep the cartesian product of the sizes below for each implementation, "
        "forward and forward+backward. On CPU the Pallas kernel runs in interpret mode: its "
        "times there are not representative. cudnn needs a GPU, splash a TPU.",
    )
    a.add_argument(
        "--impls",
        type=csv(str),
        metavar="LIST",
        help="reference,xla,cudnn,splash,pallas (default: xla,pallas, plus cudnn on GPU, "
        "splash on TPU)",
    )
    a.add_argument(
        "--mode", type=csv(str), default=["fwd", "fwd+bwd"], metavar="LIST", help="fwd,fwd+bwd"
    )
    a.add_argument("--batch", type=csv(int), default=[1], metavar="LIST", help="batch sizes")
    a.add_argument("--heads", type=csv(int), default=[4], metavar="LIST", help="query heads")
    a.add_argument(
        "--kv-heads",
        type=csv(int),
        default=[4],
        metavar="LIST",
        help="key/value heads (must divide heads)",
    )
    a.add_argument(
        "--seq", type=csv(int), default=[128, 256], metavar="LIST", help="sequence lengths"
    )
    a.add_argument("--head-dim", type=csv(int), default=[64], metavar="LIST", help="head dims")
    a.add_argument("--causal", type=csv(bool), default=[True], metavar="LIST", help="true,false")
    a.add_argument(
        "--dtype",
        type=csv(str),
        default=["float32"],
        metavar="LIST",
        help="float32,bfloat16,float16",
    )
    a.add_argument("--iters", type=int, default=5, metavar="N", help="timed calls per case")
    a.add_argument(
        "--compile-only",
        action="store_true",
        help="compile and report memory only (no timing, no error check)",
    )
    a.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the float32 reference"
    )
    for name in ("block-q", "block-k", "block-q-bwd", "block-k-bwd"):
        a.add_argument(
            f"--{name}",
            type=int,
            metavar="N",
            help=f"Pallas {name.replace('-', ' ')} size (default: per device)",
        )
    a.add_argument(
        "--tpu-topology",
        metavar="NAME",
        help="compile for one chip of this TPU topology (e.g. v5e:2x2; needs libtpu), no run",
    )
    a.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    a.add_argument("--markdown", metavar="FILE", help="write a markdown results file")
    a.add_argument("--plot", metavar="FILE", help="write a PNG of TFLOP/s vs sequence length")
    a.add_argument("--title", default="Attention benchmark", help="title of the markdown file")
    a.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.iters < 1:
        raise ConfigError(f"--iters {args.iters} must be at least 1.")
    check_outputs(args, "json", "markdown", "plot")
    from jaxlm.bench import attention as bench  # imports JAX: keep `--help` fast
    from jaxlm.bench import report

    mesh = bench.tpu_mesh(args.tpu_topology) if args.tpu_topology else None
    env = report.environment(mesh)
    extra = {"gpu": ["cudnn"], "tpu": ["splash"]}.get(env["platform"], [])
    impls = args.impls or ["xla", "pallas", *extra]
    sizes = {n: getattr(args, n) for n in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")}
    try:
        rows = bench.sweep(
            impls,
            args.mode,
            args.batch,
            args.heads,
            args.kv_heads,
            args.seq,
            args.head_dim,
            args.causal,
            args.dtype,
            iters=args.iters,
            compile_only=args.compile_only,
            check=not args.no_check,
            blocks=bench.block_sizes(env["platform"], **sizes),
            mesh=mesh,
            progress=lambda row: print(bench.table([row]).splitlines()[-1], file=sys.stderr),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps(env))
    print(bench.table(rows))
    if args.json:
        report.write_results(args.json, rows, env)
    if args.markdown:
        report.write_text(args.markdown, report.markdown(args.title, env, bench.table(rows)))
    if args.plot and not bench.write_plot(args.plot, rows, env):
        print(
            "jaxlm bench: matplotlib is not installed, so no plot was written "
            "(pip install matplotlib)",
            file=sys.stderr,
        )
    return 0
