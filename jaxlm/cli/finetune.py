"""`jaxlm finetune lm|sft|classify|predict`: continue training a pretrained model (on text or
on conversations), or classify."""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm.cli.common import (
    add_config_args,
    add_distributed_args,
    formatter,
    quiet_other_processes,
)


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained checkpoint: the LM on new text, or a text classifier",
        description="Start from a checkpoint's parameters (a run, an export or a converted "
        "model) and train the language model further or a sequence classifier.",
    )
    kinds = p.add_subparsers(dest="finetune_kind", metavar="KIND", required=True)

    lm = kinds.add_parser(
        "lm",
        formatter_class=formatter,
        help="train the LM further on new text (train.init_from; fresh optimizer, step 0)",
        description="Train the checkpoint's language model on the configured corpus. The "
        "model section and data.seq_len default to the checkpoint's, the tokenizer is the "
        "checkpoint's; a rerun resumes from the run's own checkpoints.",
    )
    lm.add_argument("--checkpoint", required=True, metavar="DIR", help="run/export to start from")
    lm.add_argument("--workdir", "-w", required=True, metavar="DIR", help="the new run directory")
    lm.add_argument("--no-progress", action="store_true", help="log lines, no progress bar")
    add_config_args(lm)
    add_distributed_args(lm)
    lm.set_defaults(run=cmd_finetune_lm)

    sft = kinds.add_parser(
        "sft",
        formatter_class=formatter,
        help="supervised fine-tuning on JSONL conversations; loss on assistant tokens only",
        description="Train the checkpoint's language model on conversations ({'messages': "
        "[{'role', 'content'}, ...]} or {'prompt', 'completion'} JSONL records) rendered "
        "with its tokenizer's chat template; only assistant tokens count in the loss. Runs "
        "like `jaxlm finetune lm` (the checkpoint's model and tokenizer, key=value "
        "overrides, resume on rerun).",
    )
    sft.add_argument("--checkpoint", required=True, metavar="DIR", help="run/export to start from")
    sft.add_argument("--train", required=True, metavar="FILE", help="JSONL training conversations")
    sft.add_argument(
        "--validation",
        metavar="FILE",
        help="JSONL validation conversations (default: data.validation_fraction of --train)",
    )
    sft.add_argument("--workdir", "-w", required=True, metavar="DIR", help="the new run directory")
    sft.add_argument("--no-progress", action="store_true", help="log lines, no progress bar")
    add_config_args(sft)
    add_distributed_args(sft)
    sft.set_defaults(run=cmd_finetune_sft)

    c = kinds.add_parser(
        "classify",
        formatter_class=formatter,
        help="train a sequence classifier (LM body + dense head) on TSV/JSONL labelled text",
        description="Fine-tune a classifier on text<TAB>label (TSV) or {'text','label'} "
        "(JSONL) lines; reports validation accuracy and saves it into --workdir.",
    )
    c.add_argument("--checkpoint", required=True, metavar="DIR", help="run/export to start from")
    c.add_argument("--train", required=True, metavar="FILE", help="labelled training data")
    c.add_argument("--workdir", "-w", required=True, metavar="DIR", help="new output directory")
    c.add_argument("--validation", metavar="FILE", help="labelled validation data")
    c.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="share of --train held out (seeded) when no --validation file is given",
    )
    c.add_argument("--epochs", type=int, default=3, metavar="N", help="passes over the data")
    c.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per step")
    c.add_argument(
        "--max-len", type=int, default=128, metavar="N", help="tokens per text; longer ones cut"
    )
    c.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="peak head learning rate")
    c.add_argument(
        "--backbone-lr", type=float, metavar="LR", help="peak backbone learning rate (lr/10)"
    )
    c.add_argument(
        "--freeze-backbone", action="store_true", help="train only the head (backbone fixed)"
    )
    c.add_argument("--weight-decay", type=float, default=0.01, metavar="W", help="AdamW decay")
    c.add_argument(
        "--eval-every", type=int, default=0, metavar="N", help="validate every N steps (0: epoch)"
    )
    c.add_argument(
        "--bidirectional",
        action="store_true",
        help="lstm/gru: a bidirectional encoder (embedding + first layer from the checkpoint)",
    )
    c.add_argument("--seed", type=int, default=0, metavar="S", help="init, shuffle and split")
    add_distributed_args(c)
    c.set_defaults(run=cmd_finetune_classify)

    pr = kinds.add_parser(
        "predict",
        formatter_class=formatter,
        help="label texts with a classifier saved by `finetune classify`",
        description="Read TSV/JSONL (labels optional) or plain lines; print JSONL predictions.",
    )
    pr.add_argument("--workdir", "-w", required=True, metavar="DIR", help="classifier directory")
    pr.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help='JSONL ("text"), TSV (first column) or one text a line',
    )
    pr.set_defaults(run=cmd_finetune_predict)


def cmd_finetune_lm(args: argparse.Namespace) -> int:
    from jaxlm.finetune.lm import lm_finetune_config

    cfg = lm_finetune_config(args.checkpoint, args.config, args.overrides)
    from jaxlm.cli.train import run_training
    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use

    return run_training(cfg, args.workdir, progress=not args.no_progress, command="finetune")


def cmd_finetune_sft(args: argparse.Namespace) -> int:
    from jaxlm.finetune.sft import sft_finetune_config

    cfg = sft_finetune_config(
        args.checkpoint, args.train, args.validation, args.config, args.overrides
    )
    from jaxlm.cli.train import run_training
    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use

    return run_training(cfg, args.workdir, progress=not args.no_progress, command="finetune")


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    from jaxlm.config.files import check_output_dir
    from jaxlm.finetune.classify import ClassifyOptions, finetune_classifier

    check_output_dir(args.workdir, "--workdir")

    opts = ClassifyOptions(
        checkpoint=args.checkpoint,
        train_file=args.train,
        workdir=args.workdir,
        validation_file=args.validation,
        validation_fraction=args.validation_fraction,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        backbone_lr=args.backbone_lr,
        freeze_backbone=args.freeze_backbone,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        bidirectional=args.bidirectional,
        seed=args.seed,
    )
    import jax

    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    quiet_other_processes(jax.process_index())
    metrics = finetune_classifier(opts)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


def cmd_finetune_predict(args: argparse.Namespace) -> int:
    from jaxlm.data.labeled import read_texts
    from jaxlm.finetune.classify import predict

    texts = read_texts(args.input)
    for text, pred in zip(texts, predict(args.workdir, texts), strict=True):
        print(json.dumps({"text": text, **pred}), file=sys.stdout)
    return 0
