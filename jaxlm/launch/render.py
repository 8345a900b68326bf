"""Render the launch recipes in `jaxlm/launch/recipes/` for a config, and run them (`jaxlm launch`).

Every recipe starts the same `jaxlm train` on each host and lets `jaxlm.parallel.distributed` find
its place in the run; the recipes differ only in how the scheduler starts processes.
A rendered recipe is a command plus the script fed to its standard input, so `--dry-run`
can print, as a copy-pasteable heredoc, exactly what a real launch would execute. The
resolved config (file plus overrides, already validated) travels inside the script, so
remote hosts need no copy of the local config file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

from jaxlm import config as config_lib
from jaxlm.config import RunConfig
from jaxlm.errors import ConfigError
from jaxlm.parallel.sharding import mesh_shape
from jaxlm.paths import is_remote

TARGETS = ("local", "slurm", "tpu", "k8s")
RECIPE_DIR = Path(__file__).resolve().parent / "recipes"  # package data: wheels carry it
RECIPES = {
    "local": "local.sh",
    "slurm": "slurm.sbatch",
    "tpu": "tpu-pod.sh",
    "k8s": "k8s-jobset.yaml",
}
# What each recipe is piped into.
COMMANDS = {
    "local": ("bash", "-s"),
    "slurm": ("sbatch",),
    "tpu": ("bash", "-s"),
    "k8s": ("kubectl", "apply", "-f", "-"),
}
HEREDOC_END = "JAXLM_EOF"
DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """What the scheduler needs beyond the run config; each target reads the fields it uses."""

    workdir: str
    nodes: int = 2  # hosts (local: processes)
    gpus_per_node: int = 8  # slurm, k8s
    per_gpu: bool = False  # slurm: one task per GPU instead of one per node
    cpu_devices: int = 0  # local: fake CPU devices per process (0: use the real devices)
    port: int | None = None  # coordinator port (slurm, tpu: JAX's default when None)
    job_name: str | None = None
    setup: str = ""  # shell run on each host before training, e.g. `source .venv/bin/activate`
    python: str | None = None  # interpreter on the hosts (default: python; local: this one)
    time: str = "24:00:00"  # slurm
    partition: str | None = None  # slurm
    account: str | None = None  # slurm
    tpu_name: str | None = None  # tpu
    zone: str | None = None  # tpu
    project: str | None = None  # tpu
    remote_dir: str = "~/jaxlm"  # tpu: the checkout on every worker
    image: str | None = None  # k8s
    pvc: str = "jaxlm-runs"  # k8s: claim mounted at the workdir's parent

    @classmethod
    def from_dict(cls, values: dict) -> LaunchOptions:
        """The options found in `values` (e.g. parsed flags); other keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A launch: run `argv` with `script` on its standard input."""

    argv: list[str]
    script: str

    def shell(self) -> str:
        """The launch as one shell command (a heredoc), for --dry-run."""
        return f"{shlex.join(self.argv)} <<'{HEREDOC_END}'\n{self.script.rstrip()}\n{HEREDOC_END}\n"


def job_name(opts: LaunchOptions) -> str:
    """A DNS-safe name (Kubernetes and SLURM accept it): the option or jaxlm-<workdir name>."""
    name = opts.job_name or f"jaxlm-{PurePosixPath(opts.workdir).name}"
    name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-")
    if not name:
        raise ConfigError(
            f"--job-name={opts.job_name!r} has no usable characters; use a-z, 0-9, -."
        )
    return name


def _check(target: str, opts: LaunchOptions) -> None:
    if target not in TARGETS:
        raise ConfigError(f"Launch target {target!r} is unknown; use one of {', '.join(TARGETS)}.")
    if opts.nodes < 1:
        raise ConfigError(f"--nodes={opts.nodes} must be at least 1.")
    if opts.gpus_per_node < 0 or opts.cpu_devices < 0:
        raise ConfigError("--gpus-per-node and --cpu-devices must be >= 0.")
    needs = {"tpu": ("tpu_name", "zone"), "k8s": ("image",)}.get(target, ())
    for field in needs:
        if getattr(opts, field) is None:
            flag = "--" + field.replace("_", "-")
            raise ConfigError(f"jaxlm launch {target} needs {flag}; pass it on the command line.")


def _train_command(opts: LaunchOptions, config_path: str, python: str) -> str:
    """`jaxlm train` with the shipped config; distributed flags are added per recipe."""
    return shlex.join(
        [python, "-m", "jaxlm.cli", "train", "--config", config_path]
        + ["--workdir", opts.workdir, "--no-progress"]
    )


def _values(target: str, cfg: RunConfig, opts: LaunchOptions) -> dict[str, str]:
    """Every placeholder value of the target's recipe."""
    name, config_yaml = job_name(opts), config_lib.to_yaml(cfg).rstrip()
    python = opts.python or (sys.executable if target == "local" else "python")
    values = {
        "job_name": name,
        "nodes": str(opts.nodes),
        "workdir": shlex.quote(opts.workdir),
        "config_yaml": config_yaml,
        "gpus_per_node": str(opts.gpus_per_node),
        "setup": opts.setup or "# (no per-host setup given)",
        "port": str(opts.port or DEFAULT_PORT),
    }
    if is_remote(opts.workdir):  # a bucket: no shell can write there, and nothing to create
        # local: a scratch file; SLURM: the submit directory, which its tasks start in
        scratch = tempfile.gettempdir() if target == "local" else ""
        shared_config = os.path.join(scratch, f"{name}.launch-config.yaml")
        values["make_workdir"] = "# the workdir is in a bucket: jaxlm train creates it"
    else:
        shared_config = str(PurePosixPath(opts.workdir) / "launch-config.yaml")
        values["make_workdir"] = f"mkdir -p {shlex.quote(opts.workdir)}"
    if target == "local":
        # Keep any XLA_FLAGS of the caller; the device count goes last so it wins.
        flags = f'"${{XLA_FLAGS:-}} --xla_force_host_platform_device_count={opts.cpu_devices}"'
        values.update(
            config_path=shlex.quote(shared_config),
            train=_train_command(opts, shared_config, python),
            device_env=(
                f"export JAX_PLATFORMS=cpu XLA_FLAGS={flags}"
                if opts.cpu_devices
                else "# devices: every process sees all of this machine's devices"
            ),
        )
    elif target == "slurm":
        extra = [
            f"#SBATCH --{k}={v}"
            for k, v in (("partition", opts.partition), ("account", opts.account))
            if v
        ]
        ids = ",".join(str(i) for i in range(opts.gpus_per_node))
        if opts.per_gpu:  # JAX's SLURM detection binds task i of a node to GPU SLURM_LOCALID
            device_env = "# devices: one GPU per task, picked by JAX from SLURM_LOCALID"
        else:  # ...so one task per node must be told to keep all of the node's GPUs
            device_env = f"export JAX_LOCAL_DEVICE_IDS={ids}" if ids else "# devices: CPU only"
        values.update(
            config_path=shlex.quote(shared_config),
            tasks_per_node=str(opts.gpus_per_node if opts.per_gpu else 1),
            time=opts.time,
            sbatch_extra="\n".join(extra) or "# (no partition or account given)",
            device_env=device_env,
            port_env=(
                f"export JAX_COORDINATOR_PORT={opts.port}"
                if opts.port
                else "# coordinator port: JAX derives it from SLURM_JOB_ID"
            ),
            task=_train_command(opts, shared_config, python),
        )
    elif target == "tpu":
        local_config = f"/tmp/{name}.yaml"  # each worker's own disk: no concurrent writes
        values.update(
            config_path=local_config,
            train=_train_command(opts, local_config, python),
            tpu_name=shlex.quote(opts.tpu_name or ""),
            zone=shlex.quote(opts.zone or ""),
            project_flag=f" --project={shlex.quote(opts.project)}" if opts.project else "",
            remote_dir=opts.remote_dir,
        )
    elif target == "k8s":
        command = _train_command(opts, "/etc/jaxlm/config.yaml", python)
        values.update(
            image=opts.image or "",
            command_json=json.dumps(
                ["bash", "-c", f"{opts.setup} && exec {command}" if opts.setup else command]
            ),
            config_yaml_indented="\n".join("    " + line for line in config_yaml.splitlines()),
            pvc=opts.pvc,
            runs_root=str(PurePosixPath(opts.workdir).parent),
        )
    return values


def render(target: str, cfg: RunConfig, opts: LaunchOptions) -> Rendered:
    """Fill the target's recipe from `recipes/` and pair it with the command that runs it."""
    _check(target, opts)
    path = RECIPE_DIR / RECIPES[target]
    if not path.is_file():
        raise ConfigError(
            f"Launch recipe {path} is missing from the installed package; reinstall jaxlm."
        )
    devices = {
        "local": opts.nodes * opts.cpu_devices,
        "slurm": opts.nodes * opts.gpus_per_node,
        "k8s": opts.nodes * opts.gpus_per_node,
    }.get(target, 0)
    if devices:  # known before submitting: refuse a mesh that can't cover them now
        mesh_shape(cfg.mesh, devices)
    values = _values(target, cfg, opts)

    def fill(match: re.Match) -> str:
        return values[match.group(1)]

    script = re.sub(r"\{\{(\w+)\}\}", fill, path.read_text(encoding="utf-8"))
    return Rendered(list(COMMANDS[target]), script)


def launch(target: str, cfg: RunConfig, opts: LaunchOptions, dry_run: bool = False) -> int:
    """Print (dry run) or execute the rendered recipe; returns the exit status."""
    rendered = render(target, cfg, opts)
    if dry_run:
        sys.stdout.write(rendered.shell())
        return 0
    tool = "gcloud" if target == "tpu" else rendered.argv[0]
    if shutil.which(tool) is None:
        raise ConfigError(
            f"{tool} is not on PATH here; run jaxlm launch {target} where {tool} works, "
            f"or add --dry-run to print the recipe."
        )
    return subprocess.run(rendered.argv, input=rendered.script, text=True).returncode
