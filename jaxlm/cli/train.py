"""`jaxlm train`, `jaxlm config` and `jaxlm export`."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import threading

from jaxlm.cli.common import add_config_args, add_distributed_args, quiet_other_processes
from jaxlm.config import describe, load_config
from jaxlm.config.files import check_output_dir
from jaxlm.errors import NonFiniteError


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (resumes if the workdir has checkpoints)",
        description="Train a model described by a YAML config plus overrides. "
        "Everything the run writes goes into --workdir.",
    )
    add_config_args(p)
    p.add_argument(
        "--workdir",
        "-w",
        required=True,
        metavar="DIR",
        help="run directory, local or gs://, s3:// (config, metrics, checkpoints, samples)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="plain log lines instead of a progress bar",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even if the tokenizer or corpus differs from the checkpoint's (logged)",
    )
    add_distributed_args(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "config",
        help="print the resolved config, or every key with its meaning",
        description="Resolve and validate a config without running anything.",
    )
    add_config_args(p)
    p.add_argument(
        "--reference",
        action="store_true",
        help="list every key with its default and description instead",
    )
    p.set_defaults(run=cmd_config)

    p = sub.add_parser(
        "export",
        help="write a run's parameters (optionally bf16) for evaluation and sharing",
        description="Write a params-only checkpoint with the run's config and tokenizer; "
        "`jaxlm generate -w OUTPUT` and runs.load_run read it.",
    )
    p.add_argument(
        "--workdir",
        "-w",
        required=True,
        metavar="DIR",
        help="a run directory: a local path, gs://BUCKET/PATH or s3://BUCKET/PATH",
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="new export directory")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step (default: newest)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype"
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge a LoRA run's adapters into its kernels: a plain model (lora_rank=0)",
    )
    add_distributed_args(p)
    p.set_defaults(run=cmd_export)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event):
    """While training: the first SIGTERM/SIGINT asks for a checkpoint and a clean exit at the
    next step boundary; a second SIGINT interrupts at once."""

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop.is_set():
            name = signal.Signals(signum).name
            print(f"jaxlm train: {name}: saving at the next step boundary", file=sys.stderr)
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _exit_after_peer_failure(error: Exception) -> None:
    """End this process of a multi-process run whose collective failed, in one sentence."""
    import jax

    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else repr(error)
    print(
        f"jaxlm train: error: process {jax.process_index()} of {jax.process_count()} failed in "
        f"a collective ({first}), most likely because another process died; start the same "
        f"command on every process to resume from the last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
    # Skip jax.distributed's exit-time shutdown barrier: it would wait for the dead process
    # until the heartbeat timeout and then abort with a stack dump.
    os._exit(3)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from jaxlm.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    return run_training(
        cfg,
        args.workdir,
        progress=not args.no_progress,
        command="train",
        allow_data_change=args.allow_data_change,
    )


def run_training(
    cfg, workdir: str, progress: bool, command: str, allow_data_change: bool = False
) -> int:
    """Train `cfg` into `workdir` under the preemption signal handlers; print samples and
    the summary.

    Exit codes: 0 done or stopped cleanly, 1 non-finite loss, 3 a peer process died.
    """
    check_output_dir(workdir, "--workdir")  # before JAX starts, let alone compiles
    import jax  # imports JAX: keep `--help` fast

    from jaxlm.finetune.lm import load_init_params, resolve_init_from
    from jaxlm.inference.samples import write_samples
    from jaxlm.train.loop import train

    quiet_other_processes(jax.process_index())
    init_params = None
    if cfg.train.init_from:  # fine-tuning: the source's tokenizer, its model config checked
        cfg = resolve_init_from(cfg)
        init_params = functools.partial(load_init_params, cfg)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            summary = train(
                cfg,
                workdir,
                init_params=init_params,
                progress=progress,
                stop=stop,
                allow_data_change=allow_data_change,
            )
    except NonFiniteError as e:
        print(f"jaxlm {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The second Ctrl-C: leave at once. A normal exit would tear the interpreter down
        # under the checkpointer's writer threads, which can crash it; an unfinished save
        # is never committed and the workdir lock of a dead process is taken over.
        print(f"jaxlm {command}: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        _exit_after_peer_failure(e)
    trained_to_end = summary["stopped_at"] is None and summary["start_step"] < cfg.train.steps
    if trained_to_end and cfg.train.sample_tokens:
        text = write_samples(cfg, summary["state"].params, summary["tokenizer"], workdir)
        if jax.process_index() == 0:
            print(text, end="", flush=True)
    if jax.process_index() == 0:
        hidden = ("state", "tokenizer", "eval_history")
        print(json.dumps({k: v for k, v in summary.items() if k not in hidden}), file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(describe())
        return 0
    from jaxlm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_output_dir(args.output, "--output")
    import jax

    from jaxlm.parallel.distributed import initialize
    from jaxlm.runs import export_params

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    quiet_other_processes(jax.process_index())
    info = export_params(
        args.workdir, args.output, step=args.step, dtype=args.dtype, merge_adapters=args.merge_lora
    )
    if jax.process_index() == 0:
        print(json.dumps(info), file=sys.stderr)
    return 0
