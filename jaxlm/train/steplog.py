"""Per-step training metrics: fetched from the device in batches, checked, written, shown."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import jax
import numpy as np

from jaxlm.errors import NonFiniteError
from jaxlm.perf.flops import mfu
from jaxlm.train.guard import first_nonfinite
from jaxlm.train.metrics import MetricsWriter
from jaxlm.train.timing import Breakdown

logger = logging.getLogger(__name__)


class StepLog:
    """Per-step metrics: read from the device in batches, checked, written and shown."""

    def __init__(
        self,
        writer: MetricsWriter,
        bar: Any,
        start_step: int,
        tokens_per_step: int,
        fpt: float,
        nan_policy: str,
        peak_flops: float | None = None,
        max_skipped: int = 0,
        timing: Breakdown | None = None,
    ):
        self.writer, self.bar, self.fpt, self.nan_policy = writer, bar, fpt, nan_policy
        self.peak_flops = peak_flops  # per device; None: MFU is not reported
        self.tokens_per_step = tokens_per_step
        self.pending: list[tuple[int, Any]] = []
        self.last: dict[str, Any] = {}
        self.skipped = 0
        self.max_skipped, self.skipped_in_a_row = max_skipped, 0  # 0: no limit
        self.throughput: list[float] = []
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.window_compiles = True  # the first window holds compilation: not a rate
        self.shown = start_step
        self.timing = Breakdown() if timing is None else timing
        self.windows: list[tuple[float, int, bool]] = []  # (seconds, steps, held compilation)

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        """Queue one step's (still on-device) metrics."""
        self.pending.append((step, metrics))
        self.window_tokens += self.tokens_per_step

    def flush(self, last_saved: int | None) -> None:
        """Fetch the queued metrics, write them, and act on non-finite values."""
        if not self.pending:
            return
        with self.timing.timed("device"):  # waits for the device to finish those steps
            values = jax.device_get([mt for _, mt in self.pending])
        records = [(s, v) for (s, _), v in zip(self.pending, values, strict=True)]
        self.pending = []
        for s, v in records:
            self.writer.write(s, v, "train")
            if float(v.get("skipped", 0.0)):
                self.skipped += 1
                self.skipped_in_a_row += 1
                logger.warning("step %d: non-finite loss or gradient norm; update skipped.", s)
                if self.skipped_in_a_row == self.max_skipped:
                    raise NonFiniteError(
                        f"Steps {s - self.max_skipped + 1} to {s} all had a non-finite loss or "
                        f"gradient norm and were skipped, so the run stopped (last checkpoint: "
                        f"{last_saved}, train.max_skipped_steps={self.max_skipped}); lower "
                        f"optimizer.lr or raise optimizer.warmup_steps."
                    )
            else:
                self.skipped_in_a_row = 0
        self.last = records[-1][1]
        bad = first_nonfinite(records)
        if bad is not None and self.nan_policy == "stop":
            step, key, value = bad
            raise NonFiniteError(
                f"The {key.replace('_', ' ')} became {value} at step {step}, so the run stopped "
                f"(last checkpoint: {last_saved}); lower optimizer.lr, or set "
                f"train.nan_policy=skip to skip such updates."
            )

    def perf(self, step: int) -> None:
        """Write the throughput of the steps since the last call; update the display."""
        elapsed = time.perf_counter() - self.window_start
        tok_s = self.window_tokens / max(elapsed, 1e-9)
        if not self.window_compiles:
            self.throughput.append(tok_s)
        self.windows.append((elapsed, step - self.shown, self.window_compiles))
        n_dev = len(jax.devices())
        tflops = tok_s * self.fpt / 1e12 / n_dev
        perf = {"tokens_per_sec": tok_s, "tflops_per_sec_per_device": tflops}
        perf.update(self.timing.take(elapsed))
        if self.peak_flops:
            perf["mfu"] = mfu(tok_s, self.fpt, self.peak_flops, n_dev)
        self.writer.write(step, perf, "perf")
        loss = float(self.last.get("loss", math.nan))
        mfu_text = f"{perf['mfu']:.1%}" if "mfu" in perf else "n/a"
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.3f}",
                tok_s=f"{tok_s:,.0f}",
                tflops=f"{tflops:.3g}",
                mfu=mfu_text,
                data=f"{perf['data_wait_fraction']:.0%}",
                refresh=False,
            )
            self.bar.update(step - self.shown)
        elif self.writer.enabled:
            logger.info(
                "step %d: loss %.4f %s tok/s %.3g TFLOP/s/device MFU %s",
                step,
                loss,
                f"{tok_s:,.0f}",
                tflops,
                mfu_text,
            )
        self.shown = step
        self.window_start, self.window_tokens = time.perf_counter(), 0
        self.window_compiles = False

    @contextlib.contextmanager
    def paused(self):
        """Keep the enclosed time out of the throughput window."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """(compile_s, train_s) of the session: the logged windows' time, the first one's
        excess over the typical step time counted as compilation."""
        steady = [sec / n for sec, n, compiles in self.windows if n and not compiles]
        total = sum(sec for sec, _, _ in self.windows)
        compile_s = 0.0
        if self.windows and self.windows[0][2] and steady:
            first_sec, first_n, _ = self.windows[0]
            compile_s = max(0.0, first_sec - first_n * float(np.median(steady)))
        return {"compile_s": compile_s, "train_s": total - compile_s}

    def median_tokens_per_sec(self) -> float | None:
        """Median throughput over the windows that held no compilation."""
        return float(np.median(self.throughput)) if self.throughput else None
