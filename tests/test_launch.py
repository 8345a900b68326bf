"""Launch recipes: each renders for a 2-node job, is valid, and does what it says when run.

The schedulers' own tools (sbatch/srun, gcloud, kubectl) are replaced by small shims that
record what they were given, so the rendered scripts really execute. The local recipe is
run for real, with training, in test_parallel_distributed.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from jaxlm import cli
from jaxlm.config import RunConfig, from_dict, load_config, resolve
from jaxlm.errors import ConfigError
from jaxlm.launch.render import TARGETS, LaunchOptions, job_name, launch, render

CFG = load_config(None, ["model.n_layers=2", "train.steps=50", "optimizer.warmup_steps=5"])
TWO_NODES = dict(
    workdir="/shared/runs/exp1",
    nodes=2,
    tpu_name="my-pod",
    zone="us-central2-b",
    image="ghcr.io/acme/jaxlm:1",
)
TRAIN = "python -m jaxlm.cli train --config {config} --workdir /shared/runs/exp1 --no-progress"


def rendered(target: str, **kw) -> str:
    return render(target, CFG, LaunchOptions(**{**TWO_NODES, **kw})).script


def shipped_config(text: str) -> RunConfig:
    """The config a shell recipe writes out with its JAXLM_CONFIG heredoc."""
    body = re.search(r"<<'JAXLM_CONFIG'\n(.*?)\nJAXLM_CONFIG\n", text, re.S).group(1)
    return resolve(from_dict(yaml.safe_load(body)))


@pytest.mark.parametrize("target", TARGETS)
def test_every_recipe_renders_for_two_nodes(target):
    script = rendered(target)
    assert "{{" not in script and "}}" not in script
    if target != "k8s":
        assert shipped_config(script) == CFG
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_local_recipe_starts_every_process_with_its_rank():
    script = rendered("local", port=23456, python="python", cpu_devices=2)
    assert "for ((i = 0; i < 2; i++)); do" in script
    train = TRAIN.format(config="/shared/runs/exp1/launch-config.yaml")
    assert f'{train} --coordinator 127.0.0.1:23456 --num-processes 2 --process-id "$i"' in script
    assert "--xla_force_host_platform_device_count=2" in script


def test_slurm_recipe_one_task_per_node_keeps_all_gpus():
    script = rendered("slurm", partition="gpu")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
        "srun --kill-on-bad-exit=1 " + TRAIN.format(config="/shared/runs/exp1/launch-config.yaml"),
    ):
        assert line in script.splitlines(), line


def test_slurm_recipe_per_gpu_lets_jax_pick_each_tasks_gpu():
    script = rendered("slurm", per_gpu=True, gpus_per_node=4, port=7777)
    assert "#SBATCH --ntasks-per-node=4" in script
    assert "JAX_LOCAL_DEVICE_IDS" not in script.replace("# devices", "")
    assert "export JAX_COORDINATOR_PORT=7777" in script


def test_tpu_recipe_runs_on_every_worker():
    script = rendered("tpu", project="proj")
    assert (
        "gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --project=proj "
        '--worker=all --command="$REMOTE" </dev/null'
    ) in script
    assert TRAIN.format(config="/tmp/jaxlm-exp1.yaml") in script


def test_k8s_jobset_gives_every_pod_the_coordinator_count_and_index():
    config_map, jobset = yaml.safe_load_all(rendered("k8s", gpus_per_node=4))
    assert resolve(from_dict(yaml.safe_load(config_map["data"]["config.yaml"]))) == CFG
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "jaxlm-exp1"
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (2, 2, "Indexed")
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"] == "jaxlm-exp1-workers-0-0.jaxlm-exp1:12355"
    assert env["JAX_NUM_PROCESSES"] == "2"
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath": index}}
    assert container["image"] == "ghcr.io/acme/jaxlm:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["command"][-1] == TRAIN.format(config="/etc/jaxlm/config.yaml")


# ---------------------------------------------- running the recipes against stand-in tools


def _shims(tmp_path: Path, monkeypatch, **scripts: str) -> Path:
    """Executables on PATH that stand in for the schedulers' tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "record"


def test_slurm_script_runs_under_sbatch_and_srun(tmp_path, monkeypatch):
    record = _shims(
        tmp_path,
        monkeypatch,
        sbatch="exec bash -s",  # run the batch script right here
        srun=f'echo "$JAX_LOCAL_DEVICE_IDS|$*" > {tmp_path}/record',
    )
    workdir = tmp_path / "run"
    opts = LaunchOptions(workdir=str(workdir), gpus_per_node=2, setup="export MARK=1")
    assert launch("slurm", CFG, opts) == 0
    devices, command = record.read_text().strip().split("|")
    assert devices == "0,1"
    assert command.startswith(f"--kill-on-bad-exit=1 python -m jaxlm.cli train --config {workdir}")
    assert load_config(workdir / "launch-config.yaml") == CFG


def test_tpu_script_sends_one_command_to_all_workers(tmp_path, monkeypatch):
    record = _shims(tmp_path, monkeypatch, gcloud=f'printf "%s\\n" "$@" > {tmp_path}/record')
    opts = LaunchOptions(workdir="/shared/runs/exp1", tpu_name="pod", zone="z", job_name="t1")
    assert launch("tpu", CFG, opts) == 0
    args = record.read_text()
    assert "--worker=all" in args.splitlines()
    remote = args.split("--command=", 1)[1]
    assert shipped_config(remote) == CFG
    assert remote.rstrip().endswith(TRAIN.format(config="/tmp/t1.yaml"))


def test_k8s_manifest_goes_to_kubectl(tmp_path, monkeypatch):
    record = _shims(
        tmp_path, monkeypatch, kubectl=f'echo "$*" > {tmp_path}/args; cat > {tmp_path}/record'
    )
    opts = LaunchOptions(workdir="/runs/a", image="img:1")
    assert launch("k8s", CFG, opts) == 0
    assert (tmp_path / "args").read_text().strip() == "apply -f -"
    kinds = [doc["kind"] for doc in yaml.safe_load_all(record.read_text())]
    assert kinds == ["ConfigMap", "JobSet"]


# -------------------------------------------------------------------------- the CLI


def test_dry_run_prints_the_heredoc_and_runs_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    assert cli.main(["launch", "slurm", "-w", "/shared/r1", "--dry-run", "train.steps=500"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sbatch <<'JAXLM_EOF'\n#!/bin/bash\n") and out.endswith("JAXLM_EOF\n")
    assert "  steps: 500" in out


def test_missing_scheduler_tool_is_one_sentence(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.main(["launch", "slurm", "-w", "/shared/r1", "train.steps=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlm launch: error: sbatch is not on PATH") and err.count("\n") == 0


def test_bad_config_is_refused_before_rendering(capsys):
    assert cli.main(["launch", "local", "-w", "/tmp/x", "--dry-run", "model.n_heads=3"]) == 2
    assert "model.n_heads=3" in capsys.readouterr().err


def test_job_names_are_dns_safe_and_options_are_checked():
    assert job_name(LaunchOptions(workdir="/runs/My_Run.v2")) == "jaxlm-my-run-v2"
    with pytest.raises(ConfigError, match="needs --image"):
        render("k8s", CFG, LaunchOptions(workdir="/runs/a"))
    with pytest.raises(ConfigError, match="--nodes=0"):
        render("local", CFG, LaunchOptions(workdir="/runs/a", nodes=0))


def test_mesh_that_cannot_cover_the_job_is_refused_before_submitting():
    cfg = load_config(None, ["mesh.data=4", "mesh.tensor=8"])  # 32 devices
    with pytest.raises(ConfigError, match="has 32 devices but 16 are available"):
        render("slurm", cfg, LaunchOptions(workdir="/runs/a", nodes=2, gpus_per_node=8))
    assert render("slurm", cfg, LaunchOptions(workdir="/runs/a", nodes=4, gpus_per_node=8))


def test_local_recipe_stops_every_process_when_one_fails(tmp_path):
    fake = tmp_path / "python"  # process 1 dies at once; process 0 would wait in a collective
    fake.write_text('#!/bin/bash\n[[ "$*" == *"--process-id 1"* ]] && exit 3\nexec sleep 60\n')
    fake.chmod(0o755)
    opts = LaunchOptions(workdir=str(tmp_path / "run"), nodes=2, python=str(fake))
    started = time.monotonic()
    assert launch("local", CFG, opts) == 3
    assert time.monotonic() - started < 30
