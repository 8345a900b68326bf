"""`jaxlm plan`: ahead-of-time memory per device, on fake CPU devices and described TPU pods
of one or several slices, with the kernels of the target (not the CPU host) compiled in."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST_XLA, assert_one_sentence

from jaxlm.bench.plan import (
    GIB,
    Plan,
    attention_for,
    cpu_device_count,
    format_plan,
    mosaic_kernels,
    target_devices,
)
from jaxlm.bench.report import tpu_devices
from jaxlm.config import MeshConfig, ModelConfig, RunConfig
from jaxlm.errors import ConfigError
from jaxlm.parallel.sharding import make_mesh

MIXTRAL = Path(__file__).resolve().parents[1] / "configs" / "mixtral-8x7b.yaml"

SMALL = [
    "model.vocab_size=512",
    "model.d_model=64",
    "model.n_layers=1",
    "model.n_heads=4",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "train.batch_size=8",
    "optimizer.warmup_steps=1",
]


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==<jax version>'; CI installs it), "
    "so no TPU topology can be described",
)


def run_plan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", "plan", "--json", *args],
        env={**os.environ, "XLA_FLAGS": FAST_XLA, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_plan_on_fake_cpu_devices_splits_state_and_judges_the_fit():
    proc = run_plan(
        "--devices", "4", "--device-memory-gb", "0.001", "mesh.data=1", "mesh.fsdp=4", *SMALL
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: does not fit in 1 MB
    plan = json.loads(proc.stdout)
    assert plan["devices"] == 4 and plan["platform"] == "cpu" and plan["fits"] is False
    assert plan["param_bytes"] == plan["params"] * 4 // 4  # float32, split four ways
    assert plan["opt_bytes"] == pytest.approx(2 * plan["param_bytes"], rel=0.01)  # Adam mu, nu
    analytic = plan["param_bytes"] + plan["opt_bytes"] + plan["batch_bytes"]
    assert plan["argument_bytes"] == pytest.approx(analytic, rel=0.01)
    assert plan["temp_bytes"] > 0 and plan["peak_bytes"] > plan["argument_bytes"]


def test_plan_refuses_a_mesh_that_does_not_fit_the_devices():
    with pytest.raises(ConfigError, match="8 are available"):
        cpu_device_count(RunConfig(mesh=MeshConfig(data=2, fsdp=2)), 8)
    with pytest.raises(ConfigError, match="pass --devices N"):
        cpu_device_count(RunConfig(mesh=MeshConfig(data=-1)), None)
    assert cpu_device_count(RunConfig(mesh=MeshConfig(data=2, tensor=4)), None) == 8


def test_report_says_whether_it_fits():
    fields = dict(
        params=10,
        flops_per_token=60.0,
        platform="tpu",
        devices=64,
        mesh={"data": 1, "fsdp": 64, "tensor": 1, "sequence": 1},
        param_bytes=GIB,
        opt_bytes=2 * GIB,
        batch_bytes=0,
        temp_bytes=5 * GIB,
        argument_bytes=3 * GIB,
        output_bytes=3 * GIB,
        alias_bytes=3 * GIB,
        code_bytes=0,
    )
    big = Plan(**fields, device_memory_bytes=16 * GIB)
    small = Plan(**fields, device_memory_bytes=4 * GIB)
    assert big.peak_bytes == 8 * GIB  # donated state is not counted twice
    assert big.fits and not small.fits
    assert "fits                yes" in format_plan(big)
    assert "fits                NO" in format_plan(small)
    assert "unknown" in format_plan(Plan(**fields, device_memory_bytes=None))


@needs_libtpu
def test_plan_for_a_64_chip_v5p_pod_matches_xla_memory_analysis():
    # Wide enough that fsdp=64 shards fill TPU tiles, so padding stays a small share.
    wide = ["model.d_model=512", "model.n_heads=4", "model.n_layers=1", "model.vocab_size=2048"]
    proc = run_plan(
        "--topology",
        "v5p:4x4x4",
        "mesh.data=1",
        "mesh.fsdp=64",
        "train.batch_size=64",
        "data.seq_len=64",
        "model.max_seq_len=64",
        "optimizer.warmup_steps=1",
        *wide,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["platform"] == "tpu" and plan["devices"] == 64
    assert plan["param_bytes"] == plan["params"] * 4 // 64  # every parameter split 64 ways
    analytic = plan["param_bytes"] + plan["opt_bytes"] + plan["batch_bytes"]
    assert plan["argument_bytes"] == pytest.approx(analytic, rel=0.05)  # XLA agrees, +padding
    assert plan["alias_bytes"] >= plan["param_bytes"] + plan["opt_bytes"]  # state is donated
    assert plan["device_memory_bytes"] == 95 * GIB and plan["fits"] is True


def test_slices_need_a_topology_and_a_positive_count(capsys):
    from jaxlm import cli

    assert cli.main(["plan", "--slices", "2", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--slices 2 needs a TPU --topology" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match=r"--slices 0 must be at least 1"):
        target_devices(RunConfig(), "v5p:4x4x4", None, 0)


@needs_libtpu
def test_two_slices_are_the_outer_blocks_of_the_data_axis():
    devices = tpu_devices("v5p:2x2x2", slices=2)
    assert len(devices) == 16 and {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh(MeshConfig(data=4, fsdp=4, dcn_data=2), devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # fsdp never crosses
    with pytest.raises(ConfigError, match=r"number of slices .* is 2; make that product 2"):
        make_mesh(MeshConfig(data=4, fsdp=4), devices)


@needs_libtpu
def test_plan_for_two_v5p_slices_keeps_per_chip_state_of_one_slice():
    # fsdp=64 inside each slice, data=2 across the two: each chip holds what it would on one
    # slice, and the batch of 128 rows is split over all 128 chips.
    wide = ["model.d_model=512", "model.n_heads=4", "model.n_layers=1", "model.vocab_size=2048"]
    proc = run_plan(
        "--topology",
        "v5p:4x4x4",
        "--slices",
        "2",
        "mesh.data=2",
        "mesh.fsdp=64",
        "mesh.dcn_data=2",
        "train.batch_size=128",
        "data.seq_len=64",
        "model.max_seq_len=64",
        "optimizer.warmup_steps=1",
        *wide,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["devices"] == 128 and plan["slices"] == 2 and plan["mesh"]["data"] == 2
    assert plan["param_bytes"] == plan["params"] * 4 // 64
    assert plan["batch_bytes"] == 64 * 5 * 4  # one row: 5 keys of 64 4-byte values
    analytic = plan["param_bytes"] + plan["opt_bytes"] + plan["batch_bytes"]
    assert plan["argument_bytes"] == pytest.approx(analytic, rel=0.05)
    assert plan["fits"] is True


@needs_libtpu
@pytest.mark.slow  # a minute or two on 2 busy cores: two 4096-wide MoE blocks at full width
def test_plan_for_mixtral_shaped_moe_on_v5p_splits_experts_over_the_expert_axis():
    # configs/mixtral-8x7b.yaml at two of its 32 layers: experts split 8 ways by the expert
    # axis and 8 ways by FSDP (their embed dimension); every other parameter only by FSDP.
    layers, d, f, x, fsdp, expert = 2, 4096, 14336, 8, 8, 8
    proc = run_plan(
        "-c", str(MIXTRAL), "--topology", "v5p:4x4x4", f"model.n_layers={layers}",
        "mesh.data=1", f"mesh.fsdp={fsdp}", f"mesh.expert={expert}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["devices"] == 64 and plan["mesh"]["expert"] == expert
    experts = layers * x * 3 * d * f  # gate, up and down kernels of every expert
    dense = plan["params"] - experts
    assert plan["param_bytes"] == 4 * (experts // (expert * fsdp) + dense // fsdp)
    assert plan["active_params"] == dense + experts * 2 // x  # top-2 of 8
    assert plan["opt_bytes"] == pytest.approx(2 * plan["param_bytes"], rel=0.01)  # Adam mu, nu
    assert plan["fits"] is True


@needs_libtpu
@pytest.mark.parametrize(
    "attention, expected, kernels",
    [
        ("pallas", "pallas", ["flash_dkv", "flash_dq", "flash_fwd"]),
        ("auto", "splash", ["splash_mha_dkv", "splash_mha_dq", "splash_mha_fwd"]),
    ],
)
def test_plan_for_a_tpu_compiles_the_tpu_kernels_not_the_cpu_ones(attention, expected, kernels):
    # The host is a CPU, but the step is compiled for v5p chips: `pallas` must be our Mosaic
    # kernel (forward, dq, dk/dv as TPU custom calls, not interpreter loops) and `auto` must
    # pick JAX's splash kernel there, not the CPU's dense attention.
    small = [x for x in SMALL if not x.startswith(("model.max", "data.seq", "train.batch"))]
    proc = run_plan(
        "--topology", "v5p:2x2x4", "mesh.data=1", "mesh.fsdp=16", "train.batch_size=16",
        "model.max_seq_len=128", "data.seq_len=128", f"model.attention={attention}", *small,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["platform"] == "tpu" and plan["attention"] == expected
    names = sorted(n.split("_segmented")[0] for n in plan["kernels"])
    assert names == kernels  # once each: one layer, one of each kernel


def test_plan_refuses_a_kernel_the_target_lacks_before_compiling():
    cfg = RunConfig(model=ModelConfig(attention="splash"))
    with pytest.raises(ConfigError, match="model.attention=splash needs a TPU") as err:
        attention_for(cfg, "cpu")
    assert_one_sentence(str(err.value))
    assert attention_for(RunConfig(model=ModelConfig(attention="auto")), "cpu") == "dense"


def test_mosaic_kernels_are_read_from_compiled_hlo():
    hlo = (
        '  %flash_fwd.3 = (f32[8]) custom-call(%p), custom_call_target="tpu_custom_call"\n'
        "  %fusion.1 = f32[8] fusion(%p), kind=kLoop\n"
        '  %splash_mha_dq = f32[8] custom-call(%p), custom_call_target="tpu_custom_call"\n'
    )
    assert mosaic_kernels(hlo) == ("flash_fwd", "splash_mha_dq")
