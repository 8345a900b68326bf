"""`jaxlm bench train`: how fast one config trains on this machine, and how much of it.

Compiles the real train step once (timed), runs warm-up steps, then times N steps on a fixed
synthetic batch (random tokens, one segment per row). Right before the timed steps it
measures the matmul peak of the machine in the same process, so MFU stays meaningful on a
machine other jobs are loading. Memory is XLA's compiled estimate per device.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxlm.bench import report
from jaxlm.config import RunConfig
from jaxlm.models import build_model
from jaxlm.parallel.sharding import make_mesh, process_rows, put_batch, validate_mesh
from jaxlm.perf.flops import flops_per_token, mfu
from jaxlm.perf.peak import ENV_OVERRIDE, device_peak, measure_matmul_flops
from jaxlm.train.optimizer import optimizer_for
from jaxlm.train.state import init_train_state, param_count
from jaxlm.train.step import jit_train_step, train_step_for

JSON_KEYS = (
    "config",
    "environment",
    "settings",
    "params",
    "flops_per_token",
    "tokens_per_step",
    "compile_s",
    "step_s",
    "median_step_s",
    "tokens_per_sec",
    "tflops_per_sec_per_device",
    "peak_flops_per_device",
    "peak_source",
    "mfu",
    "xla_flops_per_step",
    "memory",
)


def synthetic_batch(cfg: RunConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """A global batch of random tokens with the layout the data pipeline produces."""
    b, s = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, s + 1), dtype=np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
        "segment_ids": np.ones((b, s), np.int32),
        "weights": np.ones((b, s), np.float32),
    }


def _peak(dtype: str) -> tuple[float, str]:
    """Per-device peak: on CPU measured now (the machine's load changes), else device_peak."""
    if jax.devices()[0].platform == "cpu" and not os.environ.get(ENV_OVERRIDE):
        flops = measure_matmul_flops(dtype) / jax.local_device_count()
        return flops, f"{dtype} matmul measured just before the timed steps"
    return device_peak(dtype)


def bench_train(
    cfg: RunConfig,
    *,
    steps: int = 10,
    warmup: int = 2,
    name: str = "",
    seed: int = 0,
    profile_dir: str | None = None,
) -> dict[str, Any]:
    """Compile, warm up and time the train step of `cfg`; the result as a JSON-ready dict.

    `profile_dir`: also take a `jax.profiler` trace of the timed steps there."""
    m, t = cfg.model, cfg.train
    mesh = make_mesh(cfg.mesh)
    validate_mesh(cfg, mesh)
    model = build_model(m)
    total = max(t.steps, warmup + steps + 1)
    tx = optimizer_for(cfg, total)
    state, shardings = init_train_state(model, tx, cfg.data.seq_len, t.seed, mesh)
    step_fn = train_step_for(cfg, model, tx, total)
    batch = put_batch(process_rows(synthetic_batch(cfg, seed), mesh), mesh)

    start = time.perf_counter()
    compiled = jit_train_step(step_fn, shardings, mesh).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per program
    xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    peak, peak_source = _peak(m.dtype)
    times = []
    if profile_dir is not None:
        jax.profiler.start_trace(profile_dir)
    try:
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
    finally:
        if profile_dir is not None:
            jax.profiler.stop_trace()
    peak_after = _peak(m.dtype)[0]
    loss = float(jax.device_get(metrics["loss"]))

    n_dev = jax.device_count()
    tokens = t.batch_size * cfg.data.seq_len
    fpt = flops_per_token(m, cfg.data.seq_len)
    median = statistics.median(times)
    tok_s = tokens / median
    return {
        "config": name,
        "environment": report.environment(),
        "settings": {
            "family": m.family,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "d_ff": m.ff_dim,
            "vocab_size": m.vocab_size,
            "seq_len": cfg.data.seq_len,
            "batch_size": t.batch_size,
            "microbatches": t.microbatches,
            "dtype": m.dtype,
            "attention": m.attention,
            "scan_layers": m.scan_layers,
            "remat": m.remat,
            "matmul_precision": m.matmul_precision,
            "mesh": dict(mesh.shape),
        },
        "params": param_count(state.params),
        "flops_per_token": fpt,
        "tokens_per_step": tokens,
        "compile_s": compile_s,
        "warmup_steps": warmup,
        "step_s": times,
        "median_step_s": median,
        "tokens_per_sec": tok_s,
        "tflops_per_sec_per_device": tok_s * fpt / n_dev / 1e12,
        "peak_flops_per_device": peak,
        "peak_flops_per_device_after": peak_after,
        "peak_source": peak_source,
        "mfu": mfu(tok_s, fpt, peak, n_dev),
        "xla_flops_per_step": xla_flops,
        "memory": report.memory_analysis(compiled),
        "final_loss": loss,
    }


def summary_line(r: dict[str, Any]) -> str:
    """One human-readable line of a result."""
    mem = r["memory"]["peak"] / 2**20 if r.get("memory") else float("nan")
    return (
        f"{r['config'] or 'config'}: {r['params'] / 1e6:.1f}M params, "
        f"step {r['median_step_s'] * 1e3:.0f} ms (median of {len(r['step_s'])}), "
        f"{r['tokens_per_sec']:,.0f} tokens/s, "
        f"{r['tflops_per_sec_per_device']:.4g} TFLOP/s/device, "
        f"MFU {r['mfu']:.1%} of {r['peak_flops_per_device'] / 1e9:,.1f} GFLOP/s peak/device "
        f"({r['peak_source']}), compile {r['compile_s']:.1f} s, memory {mem:,.0f} MiB/device"
    )


TABLE_PREAMBLE = (
    "# `jaxlm bench train` results\n\nAppended by `jaxlm bench train`; MFU is against "
    "the peak measured in the same process just before the timed steps.\n\n"
    "| date (UTC) | config | device | params | seq x batch | settings | step ms | tokens/s "
    "| TFLOP/s/dev | peak GFLOP/s/dev | MFU | compile s | peak MiB/dev |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def table_row(r: dict[str, Any]) -> str:
    """One markdown row for the results table."""
    s, env = r["settings"], r["environment"]
    knobs = [s["dtype"], f"attn={s['attention']}"]
    knobs += ["scan"] if s["scan_layers"] else []
    knobs += [f"remat={s['remat']}"] if s["remat"] != "none" else []
    knobs += [f"XLA_FLAGS={env['xla_flags']}"] if env["xla_flags"] else []
    mem = f"{r['memory']['peak'] / 2**20:,.0f}" if r.get("memory") else "n/a"
    return (
        f"| {env['date'][:16].replace('T', ' ')} | {r['config']} | {env['device']} x"
        f"{env['device_count']} | {r['params'] / 1e6:.1f}M | {s['seq_len']}x{s['batch_size']} | "
        f"{' '.join(knobs)} | {r['median_step_s'] * 1e3:.0f} | {r['tokens_per_sec']:,.0f} | "
        f"{r['tflops_per_sec_per_device']:.4f} | {r['peak_flops_per_device'] / 1e9:.1f} | "
        f"{r['mfu']:.1%} | {r['compile_s']:.1f} | {mem} |\n"
    )


def sweep_overrides(
    d_models: list[int] | None, seqs: list[int] | None, batches: list[int] | None
) -> list[list[str]]:
    """Override lists for every combination; a d_model change keeps 64-wide heads, d_ff 4d."""
    out = []
    for d in d_models or [None]:
        for s in seqs or [None]:
            for b in batches or [None]:
                ov = []
                if d is not None:
                    ov += [f"model.d_model={d}", f"model.n_heads={max(d // 64, 1)}"]
                    ov += [f"model.d_ff={4 * d}"]
                if s is not None:
                    ov += [f"data.seq_len={s}", f"model.max_seq_len={s}"]
                if b is not None:
                    ov += [f"train.batch_size={b}"]
                out.append(ov)
    return out


def write_sweep_plot(path: str | Path, rows: list[dict[str, Any]]) -> bool:
    """tokens/s and MFU against parameter count, one line per (seq, batch); False without
    matplotlib."""
    plt = report.pyplot()
    if plt is None:
        return False
    fig, (ax_tok, ax_mfu) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["settings"]["seq_len"], r["settings"]["batch_size"]), []).append(r)
    for (s, b), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["params"])
        x = [r["params"] / 1e6 for r in rs]
        label = f"seq {s}, batch {b}"
        ax_tok.plot(x, [r["tokens_per_sec"] for r in rs], "o-", label=label)
        ax_mfu.plot(x, [100 * r["mfu"] for r in rs], "o-", label=label)
    env = rows[0]["environment"] if rows else {"device": "?", "device_count": 0}
    for ax, what in ((ax_tok, "tokens/s"), (ax_mfu, "MFU (% of measured peak)")):
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(what)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"jaxlm bench train: {env['device']} x{env['device_count']}")
    report.save_figure(fig, path)
    return True
