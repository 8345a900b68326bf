"""`jaxlm convert from-hf | to-hf`: Hugging Face GPT-2/Llama/Mixtral directories <-> jaxlm."""

from __future__ import annotations

import argparse
import json

from jaxlm.cli.common import add_distributed_args, formatter, quiet_other_processes

DTYPE_HELP = "parameter dtype written: float32 | bfloat16"


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="import or export Hugging Face GPT-2/Llama/Mixtral weights (local, gs:// or s3://)",
        description="Convert between a local Hugging Face model directory and a jaxlm export.",
    )
    what = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    q = what.add_parser(
        "from-hf",
        formatter_class=formatter,
        help="HF directory (config.json + safetensors) -> jaxlm export",
        description="Write a jaxlm export (params, config.yaml, tokenizer) from a local HF "
        "GPT-2, Llama or Mixtral directory; eval, generate and finetune take it via --checkpoint.",
    )
    q.add_argument("source", metavar="HF_DIR", help="directory with config.json and safetensors")
    q.add_argument("--output", "-o", required=True, metavar="DIR", help="new jaxlm directory")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=DTYPE_HELP)
    q.add_argument(
        "--tokenizer", metavar="FILE", help="tokenizer.json or .model (default: HF_DIR's own)"
    )
    q.set_defaults(run=cmd_from_hf)
    q = what.add_parser(
        "to-hf",
        formatter_class=formatter,
        help="jaxlm run or export -> HF directory (config.json + model.safetensors)",
        description="Write config.json, model.safetensors and the tokenizer, which "
        "GPT2LMHeadModel / LlamaForCausalLM / MixtralForCausalLM.from_pretrained load.",
    )
    q.add_argument("source", metavar="RUN_OR_EXPORT", help="a jaxlm run or export directory")
    q.add_argument("--output", "-o", required=True, metavar="DIR", help="new HF model directory")
    q.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help=DTYPE_HELP)
    q.add_argument(
        "--max-shard-gb",
        type=float,
        default=2.0,
        metavar="GB",
        help="split model.safetensors into files of at most this size (default 2)",
    )
    add_distributed_args(q)
    q.set_defaults(run=cmd_to_hf)


def cmd_from_hf(args: argparse.Namespace) -> int:
    from jaxlm.hf.convert import from_hf

    print(json.dumps(from_hf(args.source, args.output, args.dtype, args.tokenizer)))
    return 0


def cmd_to_hf(args: argparse.Namespace) -> int:
    import jax

    from jaxlm.hf.convert import to_hf
    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    quiet_other_processes(jax.process_index())
    info = to_hf(args.source, args.output, args.dtype, int(args.max_shard_gb * 1024**3))
    if jax.process_index() == 0:
        print(json.dumps(info))
    return 0
