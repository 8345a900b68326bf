"""`jaxlm plan`."""

from __future__ import annotations

import argparse
import json

from jaxlm.cli.common import add_config_args
from jaxlm.config import load_config
from jaxlm.errors import ConfigError


def register(sub) -> None:
    # `jaxlm plan`: size a config for a mesh before booking the hardware.
    p = sub.add_parser(
        "plan",
        help="parameters, FLOPs/token and per-device memory; does it fit?",
        description="Compile the train step ahead of time for a TPU topology (needs libtpu) "
        "or fake CPU devices, and report per-device memory from XLA's analysis. Kernels are "
        "those of the target (attention auto is splash on a TPU topology; pallas compiles "
        "to Mosaic). Exits 1 when it does not fit --device-memory-gb.",
    )
    add_config_args(p)
    p.add_argument("--topology", metavar="GEN:SHAPE", help="TPU slice, e.g. v5p:4x4x4, v6e:8x8")
    p.add_argument(
        "--device-memory-gb", type=float, metavar="GB", help="per device (default: TPU's HBM)"
    )
    p.add_argument(
        "--slices",
        type=int,
        metavar="N",
        help="N slices of --topology joined by the data-centre network (set mesh.dcn_data)",
    )
    p.add_argument("--devices", type=int, metavar="N", help="fake CPU devices (no --topology)")
    p.add_argument(
        "--longest-seq",
        action="store_true",
        help="bisect data.seq_len (compiling each probe) for the longest length that fits; "
        "train.batch_size rows are kept, so tokens per batch grow with the length",
    )
    p.add_argument(
        "--seq-granule",
        type=int,
        metavar="TOKENS",
        help="--longest-seq searches multiples of this (default: 512 x mesh.sequence)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    for flag, value in (
        ("--devices", args.devices),
        ("--slices", args.slices),
        ("--seq-granule", args.seq_granule),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1.")
    if args.device_memory_gb is not None and not args.device_memory_gb > 0:
        raise ConfigError(f"--device-memory-gb {args.device_memory_gb:g} must be positive.")
    cfg = load_config(args.config, args.overrides)
    from jaxlm.bench import plan  # imports JAX: keep `--help` fast

    devices = plan.target_devices(cfg, args.topology, args.devices, args.slices)
    memory = plan.default_device_memory(args.topology)
    if args.device_memory_gb is not None:
        memory = int(args.device_memory_gb * plan.GIB)
    if args.longest_seq:
        from jaxlm.bench import plan_seq

        found = plan_seq.longest_sequence(cfg, devices, memory, args.seq_granule)
        print(
            json.dumps(plan_seq.longest_dict(found))
            if args.json
            else plan_seq.format_longest(found)
        )
        return 0 if found.seq_len else 1
    try:
        result = plan.make_plan(cfg, devices, memory)
    except plan.CompileOutOfMemory as e:
        print(json.dumps({"fits": False, "error": str(e)}) if args.json else f"fits  NO: {e}")
        return 1
    print(json.dumps(plan.plan_dict(result)) if args.json else plan.format_plan(result))
    return 1 if result.fits is False else 0
