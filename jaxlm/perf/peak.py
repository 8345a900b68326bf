"""Peak FLOP/s of the device a run uses, the denominator of MFU.

Accelerators: a table of vendor dense bfloat16 figures per chip (no sparsity). CPUs have no
such number, so a float32 matmul is timed at start-up and the best value seen is cached per
machine in `~/.cache/jaxlm/peak.json` (keyed by CPU model, device count, JAX version, dtype).
`JAXLM_PEAK_FLOPS` (FLOP/s per device) overrides both, e.g. for a GPU the table lacks.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core / MXU FLOP/s per chip from the vendors' data sheets:
# NVIDIA H100 SXM and H200 989.4 TF (H100 PCIe 756 TF), A100 312 TF; Google Cloud TPU
# pages: v4 275 TF, v5e 197 TF, v5p 459 TF, v6e (Trillium) 918 TF. First match wins.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("h200", 989.4e12),
    ("h100 pcie", 756e12),
    ("h100", 989.4e12),
    ("a100", 312e12),
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)
ENV_OVERRIDE = "JAXLM_PEAK_FLOPS"
MATMUL_N = 1024  # ~2 GFLOP per product: long enough to time, short enough to repeat


def table_peak(device_kind: str) -> float | None:
    """Vendor dense bf16 peak of a device kind (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    kind = device_kind.lower()
    return next((flops for name, flops in PEAK_BF16 if name in kind), None)


def measure_matmul_flops(dtype: str = "float32", n: int = MATMUL_N, reps: int = 10) -> float:
    """FLOP/s of the best of `reps` n x n matmuls on the default device (whole machine on CPU)."""
    dt = jnp.dtype(dtype)
    a_NxN = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a_NxN).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(a_NxN).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for the cache key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    """Where measured CPU peaks are kept ($XDG_CACHE_HOME or ~/.cache, then jaxlm/peak.json)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "jaxlm" / "peak.json"


def _cache_key(dtype: str) -> str:
    return f"{cpu_model()}|{os.cpu_count()} cpus|{jax.device_count()} devices|jax {jax.__version__}|{dtype}"


def cpu_peak(dtype: str = "float32") -> float:
    """This machine's matmul FLOP/s: the best of a quick measurement now and the cache.

    Other jobs on the machine can only slow a measurement down, so the highest ever seen is
    the closest to the true peak; each start-up re-measures (~0.2 s) and raises the cached
    value if it beat it.
    """
    path, key = cache_path(), _cache_key(dtype)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cached = cache.get(key) if isinstance(cache.get(key), (int, float)) else 0.0
    flops = max(measure_matmul_flops(dtype), float(cached))
    if flops > cached:
        cache[key] = flops
        try:  # a read-only home only costs the cached value
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass
    return flops


def device_peak(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from) for the default backend.

    On CPU the devices share the machine: each gets the measured machine peak divided by
    the device count (fake devices from --xla_force_host_platform_device_count included).
    """
    if os.environ.get(ENV_OVERRIDE):
        return float(os.environ[ENV_OVERRIDE]), f"${ENV_OVERRIDE}"
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        flops = table_peak(dev.device_kind)
        if flops is not None:
            return flops, f"{dev.device_kind} bf16 dense (vendor)"
        measured = measure_matmul_flops("bfloat16", n=8192)
        return measured, f"{dev.device_kind}: measured bf16 matmul (not in the table)"
    flops = cpu_peak(dtype) / jax.local_device_count()
    return flops, f"best measured {dtype} matmul on {cpu_model()} (cached in {cache_path()})"
