"""`jaxlm bench context`: memory per device of context-parallel attention, by sequence devices."""

from __future__ import annotations

import argparse
import json

from jaxlm.cli.common import check_outputs, csv, formatter


def register_bench(what) -> None:
    """`jaxlm bench context`: sizes take comma-separated lists."""
    c = what.add_parser(
        "context",
        formatter_class=formatter,
        help="context parallelism: compiled attention memory per device vs sequence devices",
        description="Compiles (does not run) one attention layer's forward + backward with the "
        "sequence split over 1, 2, 4, 8 devices for each model.context_parallel strategy and "
        "prints XLA's temporary memory per device. On CPU the devices are faked.",
    )
    c.add_argument("--seq-len", type=int, default=32768, metavar="N", help="tokens per sequence")
    c.add_argument("--shards", type=csv(int), default=[1, 2, 4, 8], metavar="LIST")
    c.add_argument(
        "--strategies", type=csv(str), default=["none", "all_gather", "ring"], metavar="LIST"
    )
    c.add_argument("--heads", type=int, default=8, metavar="N", help="query heads")
    c.add_argument("--kv-heads", type=int, default=8, metavar="N", help="key/value heads")
    c.add_argument("--head-dim", type=int, default=64, metavar="N")
    c.add_argument("--dtype", default="bfloat16", metavar="DTYPE")
    c.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    c.set_defaults(run=cmd_bench_context)


def cmd_bench_context(args: argparse.Namespace) -> int:
    check_outputs(args, "json")
    import jax  # imports JAX: keep `--help` fast

    try:  # fake CPU devices enough for the largest split; only possible before JAX starts
        jax.config.update("jax_num_cpu_devices", max(args.shards))
    except RuntimeError:
        pass
    from jaxlm.bench import context, report

    shape = context.Shape(
        seq_len=args.seq_len,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
    )
    rows = context.memory_table(shape, args.shards, args.strategies)
    print(json.dumps({**report.environment(), "shape": vars(shape)}))
    print(context.markdown(rows))
    if args.json:
        report.write_results(args.json, rows, report.environment())
    return 0
