"""`jaxlm data prepare`: tokenize text, JSONL, Parquet, Arrow or ArrayRecord files into shards
for training."""

from __future__ import annotations

import argparse
import os

from jaxlm.cli.common import formatter


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        formatter_class=formatter,
        help="prepare corpora: tokenize files into shards that training reads at random",
        description="Corpus tools.",
    )
    what = p.add_subparsers(dest="what", metavar="ACTION", required=True)
    d = what.add_parser(
        "prepare",
        formatter_class=formatter,
        help="tokenize files into NumPy token shards plus manifest.json (resumable)",
        description="Tokenize documents in parallel into DIR/shard-NNNNN.{tokens,offsets}.npy "
        "and DIR/manifest.json. Re-running the same command skips finished shards. Inputs by "
        "name: *.txt (or any other name) plain text, *.jsonl/*.json JSON Lines, *.parquet, "
        "*.arrow (Arrow IPC), *.array_record (text or JSON records), each .txt/.jsonl also "
        "as .gz; a directory written by Hugging Face datasets' save_to_disk reads its Arrow "
        "files. Parquet and Arrow need pyarrow: pip install 'jaxlm[parquet]'.",
    )
    d.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="files, quoted globs or Hugging Face save_to_disk directories (local, gs://, s3://)",
    )
    d.add_argument(
        "--tokenizer", required=True, metavar="FILE", help="SentencePiece .model or tokenizer.json"
    )
    d.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory of the shards (local, gs:// or s3://)",
    )
    d.add_argument(
        "--split",
        default="file",
        choices=("file", "blank-lines"),
        help="text files: one document per file, or per blank-line separated block",
    )
    d.add_argument(
        "--text-field",
        "--text-column",
        dest="text_field",
        default="text",
        metavar="KEY",
        help="JSONL and JSON records: key of the text; Parquet and Arrow: its string column",
    )
    d.add_argument(
        "--min-chars", type=int, metavar="N", help="drop documents shorter than N characters"
    )
    d.add_argument(
        "--max-chars", type=int, metavar="N", help="drop documents longer than N characters"
    )
    d.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep only records whose field KEY is VALUE (JSONL, Parquet, Arrow, JSON "
        "ArrayRecord); repeat for more fields (all must match) or more values of one field "
        "(any may match)",
    )
    d.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        metavar="N",
        help="tokenizer processes (default: cores - 1; 1: tokenize in this process)",
    )
    d.add_argument(
        "--shard-mb", type=float, default=64.0, metavar="MB", help="UTF-8 text per shard, in MB"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(run=cmd_data_prepare)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jaxlm.config.files import check_output_dir
    from jaxlm.data.filters import make_filter
    from jaxlm.data.prepare import prepare
    from jaxlm.errors import ConfigError

    if not args.shard_mb > 0:
        raise ConfigError(f"--shard-mb {args.shard_mb:g} must be positive, e.g. 64.")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers} must be at least 1.")
    doc_filter = make_filter(args.min_chars, args.max_chars, args.where)
    check_output_dir(args.output, "--output")

    prepare(
        args.input,
        args.tokenizer,
        args.output,
        split=args.split,
        text_field=args.text_field,
        workers=args.workers,
        shard_bytes=max(1, int(args.shard_mb * (1 << 20))),
        doc_filter=doc_filter,
        progress=not args.no_progress,
    )
    return 0
