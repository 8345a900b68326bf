"""Decoding speed: tokens/s with the KV cache (or carried state) vs recomputing each step.

Both modes run the same jit-compiled `jaxlm.inference.generate.decode` (greedy, one
chunk): with the cache a step feeds one token; without it a step runs the model over the
whole fixed-size buffer (prompt + new tokens) and reads one column, as a cache-less jitted
decoder must.
Times are end to end per call (prefill included), the median of `iters` calls after a
compiling warm-up call; tokens/s counts new tokens of all rows.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.bench import report
from jaxlm.config import ModelConfig
from jaxlm.errors import ConfigError
from jaxlm.inference.generate import decode
from jaxlm.models import build_model


def random_params(cfg: ModelConfig, seed: int = 0) -> Any:
    """Freshly initialised float32 parameters (speed does not depend on training)."""
    init = jax.jit(build_model(cfg).init)
    return nn.unbox(init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def measure(
    cfg: ModelConfig, params: Any, batch: int, prompt_len: int, new_tokens: int, iters: int
) -> list[dict[str, Any]]:
    """One result row per mode (cache, recompute) for one size; greedy tokens must agree."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, (batch, prompt_len)).tolist()
    rows, outputs = [], {}
    for mode, use_cache in (("cache", True), ("recompute", False)):

        def run(use_cache=use_cache):
            return decode(cfg, params, prompts, new_tokens, use_cache=use_cache)

        t0 = time.perf_counter()
        outputs[mode] = run()
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        rows.append(
            {
                "family": cfg.family,
                "mode": mode,
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "median_s": median,
                "tokens_per_s": batch * new_tokens / median,
                "ms_per_step": 1e3 * median / new_tokens,
                "compile_s": max(first_s - median, 0.0),
            }
        )
    same = bool(np.array_equal(outputs["cache"], outputs["recompute"]))
    speedup = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    for row in rows:
        row["same_tokens"] = same
        row["speedup"] = speedup if row["mode"] == "cache" else 1.0
    return rows


def sweep(
    cfg: ModelConfig,
    params: Any,
    batches: Sequence[int],
    prompt_lens: Sequence[int],
    new_tokens: Sequence[int],
    iters: int,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (batch, prompt length, new tokens) combination, both modes."""
    for p in prompt_lens:
        for n in new_tokens:
            if p < 1 or n < 1:
                raise ConfigError(f"prompt length {p} and new tokens {n} must both be >= 1.")
            if not cfg.recurrent and p + n > cfg.max_seq_len:
                raise ConfigError(
                    f"prompt {p} + new tokens {n} exceed model.max_seq_len={cfg.max_seq_len}; "
                    "pick shorter lengths."
                )
    rows = []
    for b in batches:
        for p in prompt_lens:
            for n in new_tokens:
                for row in measure(cfg, params, b, p, n, iters):
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


COLUMNS = (
    ("family", "family", "s"),
    ("mode", "mode", "s"),
    ("B", "batch", "d"),
    ("prompt", "prompt_len", "d"),
    ("new", "new_tokens", "d"),
    ("tokens/s", "tokens_per_s", ",.0f"),
    ("ms/step", "ms_per_step", ".2f"),
    ("speedup", "speedup", ".1f"),
    ("same tokens", "same_tokens", "s"),
    ("compile s", "compile_s", ".1f"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of result rows."""
    return report.table(
        COLUMNS, [{**r, "same_tokens": str(r["same_tokens"]).lower()} for r in rows]
    )
