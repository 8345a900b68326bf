"""`jaxlm bench decode`: decoding tokens/s with the KV cache vs recomputing every step."""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm.cli.common import add_config_args, check_outputs, csv, formatter
from jaxlm.config import load_config
from jaxlm.errors import ConfigError


def register_bench(what) -> None:
    """`jaxlm bench decode`: sizes take comma-separated lists."""
    d = what.add_parser(
        "decode",
        formatter_class=formatter,
        help="decoding tokens/s: KV cache / carried state vs recomputing the sequence",
        description="Greedy decoding speed of a model (a config with random parameters, or a "
        "checkpoint), with and without the cache, for each batch x prompt x new-token size.",
    )
    add_config_args(d)
    d.add_argument("--checkpoint", metavar="DIR", help="use this run/export instead of --config")
    d.add_argument(
        "--batch", type=csv(int), default=[1], metavar="LIST", help="rows decoded at once"
    )
    d.add_argument(
        "--prompt-lens", type=csv(int), default=[16, 64], metavar="LIST", help="prompt lengths"
    )
    d.add_argument(
        "--new-tokens", type=csv(int), default=[32, 64], metavar="LIST", help="tokens to generate"
    )
    d.add_argument("--iters", type=int, default=3, metavar="N", help="timed calls per case")
    d.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    d.add_argument("--markdown", metavar="FILE", help="write a markdown results file")
    d.set_defaults(run=cmd_bench_decode)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    if args.iters < 1:
        raise ConfigError(f"--iters {args.iters} must be at least 1.")
    if args.checkpoint and (args.config or args.overrides):
        raise ConfigError("Give --checkpoint or --config/overrides, not both.")
    check_outputs(args, "json", "markdown")
    from jaxlm.bench import decode as decode_bench  # imports JAX: keep `--help` fast
    from jaxlm.bench import report

    if args.checkpoint:
        from jaxlm.runs import checkpoint_dir, open_checkpoint  # orbax: only when needed

        run = open_checkpoint(*checkpoint_dir(args.checkpoint))
        cfg, params, source = run.cfg.model, run.params, f"checkpoint {args.checkpoint}"
    else:
        cfg = load_config(args.config, args.overrides).model
        params = decode_bench.random_params(cfg)
        source = " ".join(["config", args.config or "(defaults)", *args.overrides])
        source += ", random params"
    env = {**report.environment(), "model": source}
    rows = decode_bench.sweep(
        cfg,
        params,
        args.batch,
        args.prompt_lens,
        args.new_tokens,
        args.iters,
        progress=lambda row: print(decode_bench.table([row]).splitlines()[-1], file=sys.stderr),
    )
    print(json.dumps(env))
    print(decode_bench.table(rows))
    if args.json:
        report.write_results(args.json, rows, env)
    if args.markdown:
        title = "Decoding speed: KV cache vs recompute"
        report.write_text(args.markdown, report.markdown(title, env, decode_bench.table(rows)))
    return 0
