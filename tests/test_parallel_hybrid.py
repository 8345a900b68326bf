"""Hybrid meshes (parallel.sharding with mesh.dcn_*): each slice or node is one block of the
device grid, the dcn factor being the outer part of the data / fsdp axis.

Fake CPU devices have no slices and one process, so the layout logic is checked on stand-in
devices; two real processes on 127.0.0.1 (this file run as a script) then form a hybrid mesh
whose granules are the processes, and one end-to-end `jaxlm launch local` run (slow) trains
on it like one process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_XLA, TINY_HOSTS, assert_one_sentence, free_port

from jaxlm.config import MeshConfig, RunConfig, load_config
from jaxlm.errors import ConfigError
from jaxlm.parallel import sharding
from jaxlm.parallel.sharding import dcn_shape, granules, hybrid_devices, mesh_shape


class FakeDevice:
    """A stand-in CPU device: an id, a process and, on TPU-like devices, a slice."""

    platform = device_kind = "cpu"

    def __init__(self, id: int, process_index: int, slice_index: int | None = None):
        self.id, self.process_index = id, process_index
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self) -> str:
        return f"D{self.id}"


def _devices(n: int, per_granule: int, slices: bool = False) -> list[FakeDevice]:
    """n devices, per_granule in each process (or slice, with two processes per slice)."""
    if slices:
        return [FakeDevice(i, i // (per_granule // 2), i // per_granule) for i in range(n)]
    return [FakeDevice(i, i // per_granule) for i in range(n)]


def _grid(cfg: MeshConfig, devices: list) -> np.ndarray:
    return hybrid_devices(mesh_shape(cfg, len(devices)), dcn_shape(cfg), devices)


def _owner(grid: np.ndarray, attr: str = "process_index") -> np.ndarray:
    return np.vectorize(lambda d: getattr(d, attr))(grid)


def test_dcn_data_is_the_outer_factor_of_the_data_axis():
    devices = _devices(8, 4)
    random.Random(0).shuffle(devices)  # the grid follows the granules, not the list order
    owner = _owner(_grid(MeshConfig(data=-1, fsdp=2, dcn_data=2), devices))
    assert owner.shape == (4, 2, 1, 1, 1)
    # data rows 0-1 live on process 0, rows 2-3 on process 1: every fsdp group in one process
    assert owner[:, :, 0, 0, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_dcn_fsdp_splits_the_fsdp_axis_and_keeps_tensor_inside_a_granule():
    owner = _owner(_grid(MeshConfig(data=1, fsdp=4, tensor=2, dcn_fsdp=2), _devices(8, 4)))
    assert owner.shape == (1, 4, 2, 1, 1)
    assert owner[0, :, :, 0, 0].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]


def test_slices_are_the_granules_where_devices_know_them():
    devices = _devices(16, 4, slices=True)  # 4 slices of 2 processes each
    assert granules(devices) == ("slices", 4)
    assert granules(_devices(16, 4)) == ("processes", 4)
    grid = _grid(MeshConfig(data=4, fsdp=4, dcn_data=2, dcn_fsdp=2), devices)
    blocks = _owner(grid, "slice_index")[:, :, 0, 0, 0]
    assert blocks.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_fallback_layout_equals_jax_layout(monkeypatch):
    cfg, devices = MeshConfig(data=4, fsdp=2, dcn_data=2), _devices(8, 4)
    want = _grid(cfg, devices)

    def refuse(*args, **kwargs):
        raise ValueError("no layout")

    monkeypatch.setattr(sharding.mesh_utils, "create_hybrid_device_mesh", refuse)
    assert _grid(cfg, devices).tolist() == want.tolist()


@pytest.mark.parametrize(
    "cfg, devices, expected",
    [
        (MeshConfig(data=-1, dcn_data=2), _devices(8, 2), r"dcn_fsdp=2 but the number of processes .* is 4"),
        (MeshConfig(data=-1), _devices(16, 8, slices=True), r"=1 but the number of slices .* is 2"),
        (MeshConfig(data=-1, dcn_data=2), [FakeDevice(i, i // 4) for i in range(6)], r"2 or 4 devices each"),
        (MeshConfig(data=-1, tensor=2, dcn_data=2), _devices(6, 3), r"dcn_data=2 does not divide the 3"),
    ],
)  # fmt: skip
def test_a_dcn_that_does_not_match_the_granules_is_refused(cfg, devices, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        sharding.make_mesh(cfg, devices)
    assert_one_sentence(str(err.value))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["mesh.dcn_data=0"], "mesh.dcn_data=0"),
        (["mesh.dcn_fsdp=-1"], "mesh.dcn_fsdp=-1"),
        (["mesh.data=1", "mesh.fsdp=4", "mesh.dcn_fsdp=3"], "mesh.dcn_fsdp=3 does not divide"),
    ],
)
def test_bad_dcn_sizes_are_refused_before_any_jax_work(overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        load_config(None, overrides)
    assert_one_sentence(str(err.value))
    load_config(None, ["mesh.dcn_data=2"])  # data=-1: checked once the devices are known


def test_no_dcn_keeps_the_plain_mesh(monkeypatch):
    assert dcn_shape(RunConfig().mesh) == (1, 1, 1, 1, 1)
    monkeypatch.setattr(sharding, "hybrid_devices", None)  # not called without dcn or slices
    assert sharding.make_mesh(MeshConfig(data=-1)).devices.shape == (1, 1, 1, 1, 1)


# ----------------------------------------------------------- two real processes (CPU)


def probe(port: int, process_id: int) -> dict:
    """Join 2 processes of 2 CPU devices; on each hybrid mesh put rows and all-reduce them."""
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    out = {}
    for dcn in ("dcn_data", "dcn_fsdp"):
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, **{dcn: 2}))
        rows_Bx3 = np.full((2, 3), process_id, np.int32)  # this process's 2 rows
        x_Bx3 = sharding.put_batch({"x": rows_Bx3}, mesh)["x"]
        total = jax.jit(lambda x: jnp.sum(x, axis=1), out_shardings=sharding.replicated(mesh))
        out[dcn] = {
            "owner": _owner(mesh.devices)[:, :, 0, 0, 0].tolist(),
            "row_sums": np.asarray(total(x_Bx3)).tolist(),
            "batch_owner": _owner(mesh.devices).reshape(-1).tolist(),  # row order = grid order
        }
    return out


def test_two_processes_form_a_hybrid_mesh():
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{FAST_XLA} --xla_force_host_platform_device_count=2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
    # Each process is one block along the dcn axis: rows of the grid for dcn_data, columns
    # (fsdp) for dcn_fsdp.
    assert results[0]["dcn_data"]["owner"] == [[0, 0], [1, 1]]
    assert results[0]["dcn_fsdp"]["owner"] == [[0, 1], [0, 1]]
    for got in results[0].values():
        # Every row of the global batch came from the process that holds it (3 columns).
        assert got["row_sums"] == [3 * p for p in got["batch_owner"]]


# ------------------------------------------- end to end (slow: ~75 s on 2 busy vCPUs)

TRAIN = [*TINY_HOSTS, "train.sample_tokens=0", "checkpoint.every_steps=0"]


def _losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [r["loss"] for r in records if r["split"] == "train" and "loss" in r]


@pytest.mark.slow
def test_training_on_two_nodes_with_dcn_data_matches_one_process(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))},
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": FAST_XLA,
    }
    cli = [sys.executable, "-m", "jaxlm.cli"]
    one = subprocess.run(
        cli + ["train", "--workdir", str(tmp_path / "one"), "--no-progress", *TRAIN],
        env={**env, "XLA_FLAGS": f"{FAST_XLA} --xla_force_host_platform_device_count=4"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    two = subprocess.run(
        cli
        + ["launch", "local", "--workdir", str(tmp_path / "two"), "--nodes", "2"]
        + ["--cpu-devices", "2", "--port", str(free_port()), *TRAIN]
        + ["mesh.data=2", "mesh.fsdp=2", "mesh.dcn_data=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    want = _losses(tmp_path / "one")
    assert len(want) == 3
    np.testing.assert_allclose(_losses(tmp_path / "two"), want, rtol=0, atol=1e-5)


if __name__ == "__main__":
    print(json.dumps(probe(int(sys.argv[1]), int(sys.argv[2]))))
