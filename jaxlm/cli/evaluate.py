"""`jaxlm eval`: loss, perplexity and bits-per-byte of a checkpoint, and multiple choice."""

from __future__ import annotations

import argparse
import json
import sys

from jaxlm.cli.common import add_distributed_args, quiet_other_processes


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="loss / perplexity / bits-per-byte of a checkpoint; multiple-choice accuracy",
        description="Evaluate a run, an export or a converted model on text files, prepared "
        "shards or the run's validation split (the default), and/or on multiple-choice items. "
        "Prints JSON.",
    )
    p.add_argument(
        "--checkpoint", "-w", metavar="DIR",
        help="a run dir (newest step), RUN/checkpoints/N, an export or a converted dir",
    )  # fmt: skip
    p.add_argument("--workdir", dest="checkpoint", help=argparse.SUPPRESS)  # the old name
    p.add_argument("--step", type=int, metavar="N", help="evaluate this checkpoint step of a run")
    p.add_argument(
        "--data", nargs="+", metavar="PATH", help=".txt / .jsonl files or prepared shard dirs"
    )
    p.add_argument(
        "--multiple-choice", metavar="FILE", help='JSONL of {"context", "choices", "answer"}'
    )
    p.add_argument("--batch-size", type=int, metavar="B", help="rows per step (default: train's)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the JSON here, not to stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_args(p)
    p.set_defaults(run=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from jaxlm.errors import ConfigError

    if not args.checkpoint:
        raise ConfigError("Name the model to evaluate with --checkpoint DIR.")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1.")
    from jaxlm import runs
    from jaxlm.config.files import check_output_file
    from jaxlm.inference import evaluate
    from jaxlm.inference.scoring import read_choice_items
    from jaxlm.paths import as_path, check_reachable, is_remote, write_bytes_atomic

    # Every input is checked before the checkpoint is read or anything compiles; a bucket
    # that can't be reached is named before anything in it is looked for.
    check_reachable(args.checkpoint, "--checkpoint")
    for path in args.data or []:
        check_reachable(path, "--data")
        if not (as_path(path, "--data").is_file() or as_path(path).is_dir()):
            raise ConfigError(
                f"--data '{path}' does not exist; give a text file or a prepared dir."
            )
    if args.multiple_choice:
        check_reachable(args.multiple_choice, "--multiple-choice")
    items = read_choice_items(args.multiple_choice) if args.multiple_choice else None
    if args.output:  # now, not after an evaluation that would then be lost
        check_output_file(args.output, "--output")
    workdir, step = runs.checkpoint_dir(args.checkpoint, args.step)
    import jax

    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    quiet_other_processes(jax.process_index())
    run = runs.open_checkpoint(workdir, step)
    ev = evaluate.Evaluator(run, args.batch_size, progress=not args.no_progress)
    report = {
        "checkpoint": str(args.checkpoint),
        "step": run.step,
        "tokenizer_sha256": run.tokenizer.sha256,
        "seq_len": ev.seq_len,
        "devices": ev.mesh.size,
        "processes": jax.process_count(),
        "mesh": dict(ev.mesh.shape),
        "results": [],
    }
    if args.data:
        report["results"] = [evaluate.evaluate_text(ev, path) for path in args.data]
    elif not args.multiple_choice:
        report["results"] = [evaluate.evaluate_validation(ev, workdir)]
    if args.multiple_choice:
        report["multiple_choice"] = evaluate.evaluate_choices(ev, args.multiple_choice, items)
    text = json.dumps(report, indent=2) + "\n"
    if jax.process_index() != 0:
        return 0  # every process computed the same report; one writes it
    if args.output:
        if is_remote(args.output):
            write_bytes_atomic(args.output, text.encode("utf-8"))
        else:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
