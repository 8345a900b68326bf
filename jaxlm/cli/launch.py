"""`jaxlm launch {local,slurm,tpu,k8s}`: the flags, beside the recipe options they fill in."""

from __future__ import annotations

import argparse

from jaxlm.cli.common import add_config_args, formatter
from jaxlm.config import load_config


def register(sub) -> None:
    """The `jaxlm launch {local,slurm,tpu,k8s}` flags, beside the options they fill in."""
    p = sub.add_parser(
        "launch",
        help="start a multi-process run: local, SLURM, TPU pod or Kubernetes (JobSet)",
        description="Render the recipe (jaxlm/launch/recipes/) for the config and run it. --dry-run "
        "prints exactly what would run instead.",
    )
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    helps = {
        "local": "--nodes processes on this machine, joined on 127.0.0.1",
        "slurm": "pipe an sbatch script to sbatch (one task per node or per GPU)",
        "tpu": "run on every worker of a Cloud TPU VM slice with gcloud --worker=all",
        "k8s": "pipe a JobSet manifest (and its config map) to kubectl apply",
    }
    for target, text in helps.items():
        t = targets.add_parser(target, help=text, description=text, formatter_class=formatter)
        add_config_args(t)
        t.add_argument("--workdir", "-w", required=True, metavar="DIR", help="run directory")
        t.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
        t.add_argument("--nodes", type=int, default=2, metavar="N", help="hosts (local: processes)")
        t.add_argument("--port", type=int, metavar="P", help="coordinator port")
        t.add_argument("--job-name", metavar="NAME", help="default: jaxlm-<workdir name>")
        t.add_argument("--setup", default="", metavar="CMD", help="shell run first on each host")
        t.add_argument("--python", metavar="EXE", help="interpreter (default: python; local: this)")
        if target == "local":
            t.add_argument(
                "--cpu-devices", type=int, default=0, metavar="K", help="fake CPU devices each"
            )
        if target in ("slurm", "k8s"):
            t.add_argument(
                "--gpus-per-node", type=int, default=8, metavar="G", help="GPUs per host"
            )
        if target == "slurm":
            t.add_argument("--per-gpu", action="store_true", help="one task per GPU, not per node")
            t.add_argument("--time", default="24:00:00", help="time limit")
            t.add_argument("--partition", help="partition")
            t.add_argument("--account", help="account")
        if target == "tpu":
            t.add_argument("--tpu-name", required=True, metavar="NAME", help="the TPU VM slice")
            t.add_argument("--zone", required=True, help="its zone")
            t.add_argument("--project", help="its Google Cloud project")
            t.add_argument("--remote-dir", default="~/jaxlm", metavar="DIR", help="repo on workers")
        if target == "k8s":
            t.add_argument("--image", required=True, help="container image with jaxlm installed")
            t.add_argument("--pvc", default="jaxlm-runs", help="claim mounted above the workdir")
    p.set_defaults(run=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    from jaxlm.launch.render import LaunchOptions, launch  # imports JAX: keep `--help` fast

    cfg = load_config(args.config, args.overrides)
    return launch(args.target, cfg, LaunchOptions.from_dict(vars(args)), dry_run=args.dry_run)
