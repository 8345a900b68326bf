"""`jaxlm tokenizer train`: a SentencePiece model from text, JSONL or gzip files."""

from __future__ import annotations

import argparse
import itertools
import os
import sys

from jaxlm.cli.common import csv, formatter


def register(sub) -> None:
    p = sub.add_parser(
        "tokenizer",
        formatter_class=formatter,
        help="train a SentencePiece tokenizer (BPE or unigram, byte fallback)",
        description="Tokenizer tools.",
    )
    what = p.add_subparsers(dest="what", metavar="ACTION", required=True)
    t = what.add_parser(
        "train",
        formatter_class=formatter,
        help="train a SentencePiece model on files; writes PREFIX.model and PREFIX.vocab",
        description="Train a lossless SentencePiece model (byte fallback, no normalisation) "
        "with jaxlm's fixed special ids pad=0 unk=1 bos=2 eos=3.",
    )
    t.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help="files or quoted globs"
    )
    t.add_argument("--vocab-size", type=int, required=True, metavar="N", help="pieces in total")
    t.add_argument(
        "--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece algorithm"
    )
    t.add_argument(
        "--output", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab"
    )
    t.add_argument(
        "--user-defined-symbols",
        type=csv(str),
        default=[],
        metavar="S,S",
        help="comma-separated pieces kept whole, e.g. '<|user|>,<|assistant|>'",
    )
    t.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        metavar="N",
        help="train on a random sample of at most N lines (0: all)",
    )
    t.add_argument(
        "--split", default="file", choices=("file", "blank-lines"), help="text files: documents"
    )
    t.add_argument("--text-field", default="text", metavar="KEY", help="JSONL: key of the text")
    t.add_argument("--threads", type=int, metavar="N", help="training threads (default: all)")
    t.add_argument("--force", action="store_true", help="overwrite an existing PREFIX.model")
    t.set_defaults(run=cmd_tokenizer_train)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from jaxlm.config.files import check_output_file
    from jaxlm.data.sources import SkipCounts, expand_inputs, iter_documents
    from jaxlm.data.tokenizer import train_tokenizer
    from jaxlm.errors import ConfigError

    prefix = args.output.removesuffix(".model")
    model_path = prefix + ".model"
    check_output_file(model_path, "--output")
    if os.path.exists(model_path) and not args.force:
        raise ConfigError(
            f"{model_path} already exists (data prepared with it would no longer match); "
            "choose another --output or pass --force."
        )
    if args.vocab_size < 261:
        raise ConfigError(
            f"--vocab-size={args.vocab_size} is too small: byte fallback alone needs 256 + 4 "
            "special pieces + newline; use at least 300."
        )
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads} must be at least 1 (or left out: all).")
    if args.max_sentences < 0 or 0 < args.max_sentences <= 100:
        raise ConfigError(
            f"--max-sentences={args.max_sentences} is too small for SentencePiece; use 0 (all "
            "lines) or more than 100."
        )
    paths = expand_inputs(args.input)
    skips = SkipCounts()

    def texts():
        for path in paths:
            yield from iter_documents(path, args.split, args.text_field, skips)

    docs = texts()
    first = next(docs, None)
    if first is None:  # every file skipped: say why, not that the vocabulary is too large
        why = skips.summary().replace("\n", "; ") or "no text"
        raise ConfigError(
            f"--input {' '.join(args.input)} holds no usable text ({why}); give UTF-8 text, "
            f"JSONL or gzip files."
        )
    tok = train_tokenizer(
        itertools.chain([first], docs),
        model_path,
        args.vocab_size,
        model_type=args.model_type,
        input_sentence_size=args.max_sentences,
        num_threads=args.threads,
        user_defined_symbols=args.user_defined_symbols,
    )
    if skips.total():
        print(skips.summary(), file=sys.stderr)
    print(f"wrote {model_path} and {prefix}.vocab: {tok.vocab_size} pieces ({args.model_type})")
    if tok.vocab_size != args.vocab_size:
        print(
            f"warning: the text only supported {tok.vocab_size} of the {args.vocab_size} "
            "pieces asked for; set model.vocab_size to the former or give more text.",
            file=sys.stderr,
        )
    return 0
