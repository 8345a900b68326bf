"""`jaxlm bench KIND`: benchmarks that print a table and write results.

Each kind lives in its own module with `register_bench(what)`, where `what` is the `bench`
subparser group, and sets `run` on its parser; add new kinds to BENCH_KINDS.
"""

from __future__ import annotations

import importlib

BENCH_KINDS = [
    "jaxlm.cli.bench_attention",
    "jaxlm.cli.bench_train",
    "jaxlm.cli.bench_data",
    "jaxlm.cli.bench_decode",
    "jaxlm.cli.bench_context",
]


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: attention kernels, train step (MFU), data pipeline, decoding",
        description="Benchmarks on this machine's default device. Each prints a table.",
    )
    what = p.add_subparsers(dest="what", metavar="KIND", required=True)
    for name in BENCH_KINDS:
        importlib.import_module(name).register_bench(what)
