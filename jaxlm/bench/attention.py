"""`jaxlm bench attention`: speed, accuracy and memory of the attention implementations.

For every combination of the swept sizes and every implementation, forward and
forward+backward: median wall time, TFLOP/s by the FlashAttention convention
(4*B*S^2*H*D forward, halved when causal; backward counts 2.5x the forward), max abs
error against a float32 reference, compile time, and XLA's compiled peak temporary memory.
Every result carries the device, JAX version and date it was measured with (`report`).
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.bench import report
from jaxlm.kernels.flash_attention import (
    DEFAULT_BLOCKS,
    BlockSizes,
    flash_attention,
    reference_attention,
    resolve_backend,
)
from jaxlm.kernels.splash import splash_attention
from jaxlm.kernels.splash import supports as splash_supports

IMPLS = ("reference", "xla", "cudnn", "splash", "pallas")
MODES = ("fwd", "fwd+bwd")
# The float32 ground truth materialises B*H*S*S floats; beyond this the error is not checked.
CHECK_LIMIT_BYTES = 2**31


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured point of the sweep."""

    impl: str
    mode: str
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: str


def attention_flops(case: Case) -> float:
    """Matmul FLOPs by the FlashAttention convention (what TFLOP/s are computed from)."""
    flops = 4.0 * case.batch * case.seq**2 * case.heads * case.head_dim
    flops /= 2 if case.causal else 1
    return flops * (3.5 if case.mode == "fwd+bwd" else 1.0)


def tpu_mesh(topology: str) -> Mesh:
    """A one-chip mesh of a TPU topology (e.g. v5e:2x2) to AOT-compile for; needs libtpu."""
    return Mesh(np.asarray(report.tpu_devices(topology)[:1]), ("chip",))


def block_sizes(platform: str, **given: int | None) -> BlockSizes | None:
    """The platform's default Pallas blocks with the given sizes replaced; None if none given."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    return dataclasses.replace(DEFAULT_BLOCKS[resolve_backend(platform)], **given)


def _attention_fn(
    impl: str, causal: bool, blocks: BlockSizes | None, backend: str | None = None
) -> Callable:
    """(q, k, v) -> out for one implementation, without segment ids."""
    if impl == "pallas":
        return lambda q, k, v: flash_attention(
            q, k, v, causal=causal, block_sizes=blocks, backend=backend
        )
    if impl == "splash":
        return lambda q, k, v: splash_attention(q, k, v, causal=causal)
    if impl == "reference":
        return lambda q, k, v: reference_attention(q, k, v, causal=causal)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation=impl
    )


def _skip_reason(case: Case, platform_name: str) -> str | None:
    """Why a case can't run here, or None."""
    if case.heads % case.kv_heads:
        return f"{case.kv_heads} kv heads do not divide {case.heads} heads"
    if case.impl == "cudnn" and platform_name != "gpu":
        return "cuDNN needs a GPU"
    if case.impl == "cudnn" and case.dtype == "float32":
        return "cuDNN attention needs bfloat16/float16"
    if case.impl == "splash" and platform_name != "tpu":
        return "splash attention needs a TPU"
    if case.impl == "splash" and not splash_supports(case.seq, case.seq):
        return "splash attention needs the length in whole 128-row blocks"
    return None


def _inputs(case: Case, seed: int = 0):
    """Random q, k, v and an output cotangent of the case's shapes and dtype."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    dtype = jnp.dtype(case.dtype)
    q_shape = (case.batch, case.seq, case.heads, case.head_dim)
    kv_shape = (case.batch, case.seq, case.kv_heads, case.head_dim)
    return (
        jax.random.normal(kq, q_shape, dtype),
        jax.random.normal(kk, kv_shape, dtype),
        jax.random.normal(kv, kv_shape, dtype),
        jax.random.normal(kd, q_shape, jnp.float32),
    )


def _program(fn: Callable, mode: str) -> Callable:
    """The function timed: out, or (out, dq, dk, dv) for a fixed output cotangent."""
    if mode == "fwd":
        return lambda q, k, v, d_out: fn(q, k, v)

    def fwd_bwd(q, k, v, d_out):
        out, pullback = jax.vjp(fn, q, k, v)
        return (out, *pullback(d_out.astype(out.dtype)))

    return fwd_bwd


def _max_error(case: Case, results: Sequence[jax.Array], args) -> float | None:
    """Max abs difference of out (and grads) from a float32 reference on the same inputs."""
    b, s, h = case.batch, case.seq, case.heads
    if 4 * b * h * s * s > CHECK_LIMIT_BYTES:
        return None
    q, k, v, d_out = (x.astype(jnp.float32) for x in args)
    truth_fn = lambda q, k, v: reference_attention(q, k, v, causal=case.causal)  # noqa: E731
    truth = jax.jit(_program(truth_fn, case.mode))(q, k, v, d_out)
    truth = truth if isinstance(truth, tuple) else (truth,)
    results = results if isinstance(results, tuple) else (results,)
    return max(
        float(jnp.max(jnp.abs(r.astype(jnp.float32) - t)))
        for r, t in zip(results, truth, strict=True)
    )


def measure(
    case: Case,
    *,
    iters: int = 10,
    compile_only: bool = False,
    check: bool = True,
    blocks: BlockSizes | None = None,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """One row of results for `case` (timings are None when compile_only).

    With a `mesh` (from `tpu_mesh`), the program is compiled for its one device only:
    shard_map is what lets Mosaic kernels compile ahead of time for another platform.
    """
    row: dict[str, Any] = dataclasses.asdict(case)
    row["gflops"] = attention_flops(case) / 1e9
    target = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    reason = _skip_reason(case, "gpu" if target in ("cuda", "rocm") else target)
    if reason:
        return {**row, "skipped": reason}
    backend = None if mesh is None else target
    fn = _program(_attention_fn(case.impl, case.causal, blocks, backend), case.mode)
    args = jax.eval_shape(lambda: _inputs(case))
    if mesh is not None:
        compile_only = True
        fn = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
        on_mesh = NamedSharding(mesh, P())
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_mesh) for a in args]
    program = jax.jit(fn)
    start = time.perf_counter()
    try:
        compiled = program.lower(*args).compile()
    except Exception as e:  # an implementation the device lacks: record it, keep sweeping
        return {**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    row["compile_s"] = time.perf_counter() - start
    mem = report.memory_analysis(compiled)
    row["temp_bytes"] = None if mem is None else mem["temp"]
    row.update(median_ms=None, tflops=None, max_abs_error=None)
    if compile_only:
        return row
    inputs = _inputs(case)
    out = jax.block_until_ready(compiled(*inputs))  # warm-up, and the values checked
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - start)
    row["median_ms"] = 1e3 * statistics.median(times)
    row["tflops"] = attention_flops(case) / (row["median_ms"] * 1e-3) / 1e12
    row["max_abs_error"] = _max_error(case, out, inputs) if check else None
    return row


def sweep(
    impls: Sequence[str],
    modes: Sequence[str],
    batch: Sequence[int],
    heads: Sequence[int],
    kv_heads: Sequence[int],
    seq: Sequence[int],
    head_dim: Sequence[int],
    causal: Sequence[bool],
    dtype: Sequence[str],
    progress: Callable[[dict[str, Any]], None] | None = None,
    **measure_kw: Any,
) -> list[dict[str, Any]]:
    """Measure the cartesian product of the given sizes for each implementation and mode."""
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"bench impl {impl!r} is unknown; use some of {', '.join(IMPLS)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"bench mode {mode!r} is unknown; use some of {', '.join(MODES)}")
    rows = []
    for b, h, kh, s, e, c, dt, impl, mode in itertools.product(
        batch, heads, kv_heads, seq, head_dim, causal, dtype, impls, modes
    ):
        rows.append(measure(Case(impl, mode, b, h, kh, s, e, c, dt), **measure_kw))
        if progress:
            progress(rows[-1])
    return rows


COLUMNS = (
    ("impl", "impl", "s"),
    ("mode", "mode", "s"),
    ("B", "batch", "d"),
    ("H", "heads", "d"),
    ("K", "kv_heads", "d"),
    ("S", "seq", "d"),
    ("D", "head_dim", "d"),
    ("causal", "causal", "s"),
    ("dtype", "dtype", "s"),
    ("ms", "median_ms", ".3f"),
    ("TFLOP/s", "tflops", ".4f"),
    ("max err", "max_abs_error", ".1e"),
    ("compile s", "compile_s", ".2f"),
    ("temp MiB", "temp_mib", ".1f"),
    ("note", "skipped", "s"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of result rows (skipped cases say why)."""
    shown = [
        {
            **row,
            "causal": str(row["causal"]).lower(),
            "temp_mib": None if row.get("temp_bytes") is None else row["temp_bytes"] / 2**20,
            "skipped": row.get("skipped", ""),
        }
        for row in rows
    ]
    return report.table(COLUMNS, shown)


def write_plot(path: str | Path, rows: Sequence[dict[str, Any]], env: dict[str, Any]) -> bool:
    """PNG of TFLOP/s against sequence length: one panel per (mode, dtype), colour by
    implementation, line style by shape; False when matplotlib is not installed."""
    plt = report.pyplot()
    if plt is None:
        return False
    timed = [r for r in rows if r.get("tflops") is not None]
    panels = sorted({(r["mode"], r["dtype"]) for r in timed})
    shapes = sorted(
        {(r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"]) for r in timed}
    )
    impls = sorted({r["impl"] for r in timed})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4.5))
    axes = np.atleast_1d(axes)
    for ax, (mode, dtype) in zip(axes, panels, strict=False):
        for impl, shape in itertools.product(impls, shapes):
            points = sorted(
                (r["seq"], r["tflops"])
                for r in timed
                if (r["mode"], r["dtype"], r["impl"]) == (mode, dtype, impl)
                and (r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["causal"]) == shape
            )
            if not points:
                continue
            b, h, kh, d, causal = shape
            label = f"{impl} B{b} H{h}/K{kh} D{d}{' causal' if causal else ''}"
            xs, ys = zip(*points, strict=True)
            style = ("-", "--", ":", "-.")[shapes.index(shape) % 4]
            ax.plot(xs, ys, style, marker="o", color=f"C{impls.index(impl)}", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, {dtype}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"attention on {env['device']} (Pallas {env['pallas_mode']}), jax {env['jax']}")
    report.save_figure(fig, path, dpi=90)
    return True
