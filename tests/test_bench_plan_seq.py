"""`jaxlm plan --longest-seq`: bisection over data.seq_len with ahead-of-time compiles."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import FAST_XLA

from jaxlm.bench import plan_seq
from jaxlm.bench.plan import GIB, CompileOutOfMemory, Plan, _gib_in, _vmem_oom
from jaxlm.config import load_config
from jaxlm.errors import ConfigError

SMALL = [
    "model.vocab_size=512",
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_seq_len=64",
    "data.seq_len=64",
    "train.batch_size=2",
    "optimizer.warmup_steps=1",
]


def fake_compile(bytes_per_token: int, fixed: int = 1000):
    """A stand-in for make_plan whose peak grows linearly with the length; records calls."""
    calls = []

    def compile_plan(cfg, devices, memory):
        calls.append(cfg.data.seq_len)
        assert cfg.model.max_seq_len >= cfg.data.seq_len  # the probe's config must validate
        peak = fixed + bytes_per_token * cfg.data.seq_len
        return Plan(
            params=1, flops_per_token=1.0, platform="cpu", devices=1, mesh={},
            param_bytes=0, opt_bytes=0, batch_bytes=0, temp_bytes=peak, argument_bytes=0,
            output_bytes=0, alias_bytes=0, code_bytes=0, device_memory_bytes=memory,
        )  # fmt: skip

    return compile_plan, calls


@pytest.mark.parametrize("memory", [1000 + 10 * 3000, 1000 + 10 * 512, 1000 + 10 * 70_000])
def test_bisection_finds_the_longest_fitting_multiple_of_the_granule(memory):
    cfg = load_config(None, SMALL)
    compile_plan, calls = fake_compile(10)
    found = plan_seq.longest_sequence(cfg, [], memory, granule=256, compile_plan=compile_plan)
    truth = (memory - 1000) // 10 // 256 * 256
    assert found.seq_len == truth
    assert found.plan is not None and found.plan.fits
    assert len(calls) == len(set(calls))  # no length compiled twice
    assert len(calls) <= 2 * (truth // 256).bit_length() + 2  # logarithmic, not a sweep
    assert "longest sequence" in plan_seq.format_longest(found)


def test_nothing_fits_says_so():
    cfg = load_config(None, SMALL)
    compile_plan, _ = fake_compile(10, fixed=10**9)
    found = plan_seq.longest_sequence(cfg, [], 5000, granule=128, compile_plan=compile_plan)
    assert found.seq_len == 0 and found.plan is None
    assert "none" in plan_seq.format_longest(found)
    assert json.loads(json.dumps(plan_seq.longest_dict(found)))["longest_seq_len"] == 0


def test_probe_config_raises_max_seq_len_only_when_needed():
    cfg = load_config(None, SMALL)
    longer = plan_seq.with_seq_len(cfg, 4096)
    assert (longer.data.seq_len, longer.model.max_seq_len) == (4096, 4096)
    shorter = plan_seq.with_seq_len(dataclasses.replace(cfg), 32)
    assert (shorter.data.seq_len, shorter.model.max_seq_len) == (32, 64)


def test_granule_defaults_to_512_per_sequence_device_and_must_be_positive():
    cfg = load_config(None, [*SMALL, "mesh.sequence=4"])
    assert plan_seq.default_granule(cfg) == 2048
    with pytest.raises(ConfigError, match="seq-granule"):
        plan_seq.longest_sequence(cfg, [], 10**9, granule=-5)


def test_cli_bisects_real_compiles_on_fake_cpu_devices():
    """End to end: real compiles of a tiny model, the answer fits and twice it does not."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.cli",
            "plan",
            "--json",
            "--devices",
            "1",
            "--device-memory-gb",
            "0.002",
            "--longest-seq",
            "--seq-granule",
            "64",
            *SMALL,
        ],  # fmt: skip
        env={**os.environ, "XLA_FLAGS": FAST_XLA},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    probes = {p["seq_len"]: p for p in result["probes"]}
    best = result["longest_seq_len"]
    assert best > 0 and probes[best]["fits"]
    assert all(not p["fits"] for n, p in probes.items() if n > best)
    assert best + 64 in probes  # the next granule up was compiled and missed
    peaks = [probes[n]["peak_bytes"] for n in sorted(probes)]
    assert peaks == sorted(peaks)  # memory grows with the length


def test_a_compile_the_target_refuses_counts_as_does_not_fit():
    """XLA:TPU refuses to compile a step over HBM (RESOURCE_EXHAUSTED): that is a "no"."""
    cfg = load_config(None, SMALL)
    compile_plan, calls = fake_compile(10)

    def refusing(cfg, devices, memory):
        if cfg.data.seq_len > 1000:
            raise CompileOutOfMemory(cfg.data.seq_len * 10, memory)
        return compile_plan(cfg, devices, memory)

    found = plan_seq.longest_sequence(cfg, [], 10**9, granule=128, compile_plan=refusing)
    assert found.seq_len == 896
    refused = [p for p in found.probes if p.seq_len > 1000]
    assert refused and all(not p.fits and p.peak_bytes == p.seq_len * 10 for p in refused)


def test_the_tpu_compilers_out_of_memory_message_is_read():
    text = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (127.52G) exceeds available HBM (95.74G)."
    )
    assert round(_gib_in(text, "required") / GIB, 2) == 127.52
    assert round(_gib_in(text, "available") / GIB, 2) == 95.74
    assert _gib_in("something else", "required") is None
    assert "127.52 GiB" in str(CompileOutOfMemory(_gib_in(text, "required"), None))


def test_a_kernels_vmem_refusal_names_the_kernel_and_its_sizes():
    """Mosaic kernels hold their blocks in VMEM; XLA:TPU refuses one over the scoped limit."""
    text = (
        "RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of memory in memory "
        "space vmem while allocating on stack for %flash_dq.6 = f32[1,32,32768,128] "
        "custom-call(%bitcast.111) Scoped allocation with size 32.50M and limit 16.00M "
        "exceeded scoped vmem limit by 16.50M."
    )
    e = _vmem_oom(text)
    assert e is not None and e.kernel == "flash_dq"
    assert (e.required_bytes, e.available_bytes) == (int(32.5 * 2**20), 16 * 2**20)
    assert "flash_dq needs 32.5 MiB of scoped VMEM" in str(e)
    assert _vmem_oom("RESOURCE_EXHAUSTED: out of HBM") is None
