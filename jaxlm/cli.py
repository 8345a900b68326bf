"""The `jaxlm` command line: one entry point, one subcommand per job.

Only this module reads process-wide state (argv, environment); everything below it takes
explicit arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from jaxlm.config import ConfigError, describe, load_config
from jaxlm.launch import add_launch_parser

OVERRIDE_HELP = "config overrides, e.g. model.n_layers=4 train.steps=200"


def _formatter(prog: str) -> argparse.HelpFormatter:
    # Wide enough that every option's help stays on one line.
    return argparse.HelpFormatter(prog, max_help_position=30, width=110)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", metavar="FILE", help="YAML config (default: built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDE_HELP)


def _csv(kind):
    """argparse type: a comma-separated list of `kind` values."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if kind is bool:
            table = {"true": True, "false": False}
            if any(t.lower() not in table for t in items):
                raise argparse.ArgumentTypeError(f"{text!r} is not a list of true/false")
            return [table[t.lower()] for t in items]
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of {kind.__name__}") from None

    return parse


def _add_bench_parser(sub) -> None:
    """`jaxlm bench attention`: every sweep option takes a comma-separated list."""
    p = sub.add_parser(
        "bench",
        help="benchmark kernels (attention: Pallas flash vs XLA vs cuDNN)",
        description="Benchmark kernels on this machine's default device.",
    )
    what = p.add_subparsers(dest="what", metavar="KERNEL", required=True)
    a = what.add_parser(
        "attention",
        formatter_class=_formatter,
        help="sweep attention implementations: ms, TFLOP/s, error, compile time, memory",
        description="Sweep the cartesian product of the sizes below for each implementation, "
        "forward and forward+backward. On CPU the Pallas kernel runs in interpret mode: its "
        "times there are not representative.",
    )
    a.add_argument(
        "--impls",
        type=_csv(str),
        metavar="LIST",
        help="reference,xla,cudnn,pallas (default: xla,pallas, plus cudnn on GPU)",
    )
    a.add_argument(
        "--mode", type=_csv(str), default=["fwd", "fwd+bwd"], metavar="LIST", help="fwd,fwd+bwd"
    )
    a.add_argument("--batch", type=_csv(int), default=[1], metavar="LIST", help="batch sizes")
    a.add_argument("--heads", type=_csv(int), default=[4], metavar="LIST", help="query heads")
    a.add_argument(
        "--kv-heads",
        type=_csv(int),
        default=[4],
        metavar="LIST",
        help="key/value heads (must divide heads)",
    )
    a.add_argument(
        "--seq", type=_csv(int), default=[128, 256], metavar="LIST", help="sequence lengths"
    )
    a.add_argument("--head-dim", type=_csv(int), default=[64], metavar="LIST", help="head dims")
    a.add_argument("--causal", type=_csv(bool), default=[True], metavar="LIST", help="true,false")
    a.add_argument(
        "--dtype",
        type=_csv(str),
        default=["float32"],
        metavar="LIST",
        help="float32,bfloat16,float16",
    )
    a.add_argument("--iters", type=int, default=5, metavar="N", help="timed calls per case")
    a.add_argument(
        "--compile-only",
        action="store_true",
        help="compile and report memory only (no timing, no error check)",
    )
    a.add_argument(
        "--no-check", action="store_true", help="skip the comparison with the float32 reference"
    )
    for name in ("block-q", "block-k", "block-q-bwd", "block-k-bwd"):
        a.add_argument(
            f"--{name}",
            type=int,
            metavar="N",
            help=f"Pallas {name.replace('-', ' ')} size (default: per device)",
        )
    a.add_argument(
        "--tpu-topology",
        metavar="NAME",
        help="compile for one chip of this TPU topology (e.g. v5e:2x2; needs libtpu), no run",
    )
    a.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    a.add_argument("--markdown", metavar="FILE", help="write a markdown results file")
    a.add_argument("--plot", metavar="FILE", help="write a PNG of TFLOP/s vs sequence length")
    a.add_argument("--title", default="Attention benchmark", help="title of the markdown file")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """Multi-process flags; without them jaxlm.distributed reads the scheduler's environment."""
    p.add_argument(
        "--coordinator", metavar="HOST:PORT", help="address of process 0 (multi-process runs)"
    )
    p.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    p.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")


def _add_plan_parser(sub) -> None:
    """`jaxlm plan`: size a config for a mesh before booking the hardware."""
    p = sub.add_parser(
        "plan",
        help="parameters, FLOPs/token and per-device memory; does it fit?",
        description="Compile the train step ahead of time for a TPU topology (needs libtpu) "
        "or fake CPU devices, and report per-device memory from XLA's analysis. "
        "Exits 1 when it does not fit --device-memory-gb.",
    )
    _add_config_args(p)
    p.add_argument("--topology", metavar="GEN:SHAPE", help="TPU slice, e.g. v5p:4x4x4, v6e:8x8")
    p.add_argument(
        "--device-memory-gb", type=float, metavar="GB", help="per device (default: TPU's HBM)"
    )
    p.add_argument("--devices", type=int, metavar="N", help="fake CPU devices (no --topology)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="jaxlm",
        formatter_class=_formatter,
        description="Train, evaluate and sample JAX/Flax language models, from a laptop CPU "
        "to a multi-host pod.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (resumes if the workdir has checkpoints)",
        description="Train a model described by a YAML config plus overrides. "
        "Everything the run writes goes into --workdir.",
    )
    _add_config_args(p)
    p.add_argument(
        "--workdir",
        "-w",
        required=True,
        metavar="DIR",
        help="run directory (config, tokenizer, metrics, checkpoints, samples)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="plain log lines instead of a progress bar",
    )
    _add_distributed_args(p)

    p = sub.add_parser(
        "config",
        help="print the resolved config, or every key with its meaning",
        description="Resolve and validate a config without running anything.",
    )
    _add_config_args(p)
    p.add_argument(
        "--reference",
        action="store_true",
        help="list every key with its default and description instead",
    )

    p = sub.add_parser(
        "generate",
        help="continue a prompt with a trained run's latest checkpoint",
        description="Load the newest checkpoint of a run and sample text.",
    )
    p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--prompt", default="ROMEO.\n", metavar="TEXT", help="text to continue")
    p.add_argument(
        "--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate"
    )
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 means greedy")
    p.add_argument(
        "--top-k", type=int, default=40, metavar="K", help="sample among the k likeliest (0: all)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")

    p = sub.add_parser(
        "export",
        help="write a run's parameters (optionally bf16) for evaluation and sharing",
        description="Write a params-only checkpoint with the run's config and tokenizer; "
        "`jaxlm generate -w OUTPUT` and evaluate.load_run read it.",
    )
    p.add_argument("--workdir", "-w", required=True, metavar="DIR", help="a run directory")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="new export directory")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step (default: newest)")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype"
    )
    _add_bench_parser(sub)
    add_launch_parser(sub, _add_config_args, _formatter)
    _add_plan_parser(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = _formatter
    return parser


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
    from jaxlm.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id)  # before any JAX use
    import jax

    from jaxlm.train.guard import NonFiniteError
    from jaxlm.train.loop import train  # imports JAX: keep `--help` fast

    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            summary = train(cfg, args.workdir, progress=not args.no_progress, stop=stop)
    except NonFiniteError as e:
        print(f"jaxlm train: error: {e}", file=sys.stderr)
        return 1
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        _exit_after_peer_failure(e)
    report = {k: v for k, v in summary.items() if k not in ("state", "samples", "eval_history")}
    print(json.dumps(report), file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(describe())
        return 0
    from jaxlm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jaxlm.evaluate import load_run

    run = load_run(args.workdir)
    from jaxlm.generate import generate

    ids = run.tokenizer.encode(args.prompt, bos=True)
    out = generate(
        run.cfg.model,
        run.params,
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_id=run.tokenizer.eos_id,
    )[0]
    print(args.prompt + run.tokenizer.decode(out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from jaxlm.export import export_params

    info = export_params(args.workdir, args.output, step=args.step, dtype=args.dtype)
    print(json.dumps(info), file=sys.stderr)
    return 0


def _jax_version() -> str:
    import jax

    return jax.__version__


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from jaxlm import bench  # imports JAX: keep `--help` fast

    mesh = None
    if args.tpu_topology:
        try:
            mesh = bench.tpu_mesh(args.tpu_topology)
        except Exception as e:  # no libtpu, or a topology name it does not know
            raise ConfigError(
                f"--tpu-topology {args.tpu_topology} could not be built ({e}); install libtpu "
                f'with pip install "jax[tpu]=={_jax_version()}" and use a name like v5e:2x2.'
            ) from None
    env = bench.environment(mesh)
    impls = args.impls or ["xla", "pallas"] + (["cudnn"] if env["platform"] == "gpu" else [])
    blocks = None
    sizes = {n: getattr(args, n) for n in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")}
    if any(v is not None for v in sizes.values()):
        from jaxlm.kernels.flash_attention import DEFAULT_BLOCKS, resolve_backend

        given = {k: v for k, v in sizes.items() if v is not None}
        blocks = dataclasses.replace(DEFAULT_BLOCKS[resolve_backend(env["platform"])], **given)
    try:
        rows = bench.sweep(
            impls,
            args.mode,
            args.batch,
            args.heads,
            args.kv_heads,
            args.seq,
            args.head_dim,
            args.causal,
            args.dtype,
            iters=args.iters,
            compile_only=args.compile_only,
            check=not args.no_check,
            blocks=blocks,
            mesh=mesh,
            progress=lambda row: print(bench.table([row]).splitlines()[-1], file=sys.stderr),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(json.dumps(env))
    print(bench.table(rows))
    if args.json:
        bench.write_json(args.json, rows, env)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(bench.markdown(rows, env, args.title))
    if args.plot and not bench.write_plot(args.plot, rows, env):
        print(
            "jaxlm bench: matplotlib is not installed, so no plot was written "
            "(pip install matplotlib)",
            file=sys.stderr,
        )
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from jaxlm.launch import LaunchOptions, launch

    cfg = load_config(args.config, args.overrides)
    return launch(args.target, cfg, LaunchOptions.from_dict(vars(args)), dry_run=args.dry_run)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from jaxlm import plan  # imports JAX: keep `--help` fast

    devices = plan.target_devices(cfg, args.topology, args.devices)
    memory = plan.default_device_memory(args.topology)
    if args.device_memory_gb is not None:
        memory = int(args.device_memory_gb * plan.GIB)
    result = plan.make_plan(cfg, devices, memory)
    print(json.dumps(plan.plan_dict(result)) if args.json else plan.format_plan(result))
    return 1 if result.fits is False else 0


COMMANDS = {
    "train": cmd_train,
    "config": cmd_config,
    "generate": cmd_generate,
    "export": cmd_export,
    "bench": cmd_bench,
    "launch": cmd_launch,
    "plan": cmd_plan,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `jaxlm` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"jaxlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
