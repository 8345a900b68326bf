"""Where a run's wall-clock time goes: step phases, profiler windows, and each session's account.

`Breakdown` times the host-side phases of the step loop: waiting for the next batch (`data`),
handing the step to the device (`dispatch`), blocking on the device when metrics are read
(`device`), and the time spent evaluating (`eval`) and starting checkpoint saves
(`checkpoint`). Dispatch is asynchronous, so a fast host shows most of its time as `device`:
that is the device computing, not the host idling.

`Profiler` takes `jax.profiler` traces of the configured step windows into WORKDIR/profile/,
readable by TensorBoard's profile plugin and by Perfetto.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

PHASES = ("data", "dispatch", "device", "eval", "checkpoint")
DATA_WARN_FRACTION = 0.05  # warn when waiting for data takes more of the step time than this


class Breakdown:
    """Seconds spent in each phase, per logging window and over the whole session."""

    def __init__(self) -> None:
        self.window = dict.fromkeys(PHASES, 0.0)
        self.session = dict.fromkeys(PHASES, 0.0)
        self.warned = False

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.window[phase] += spent
            self.session[phase] += spent

    def take(self, step_seconds: float) -> dict[str, float]:
        """The window's seconds per phase and the share of `step_seconds` (the window's
        training time) spent waiting for data; starts a new window."""
        out = {f"{p}_s": s for p, s in self.window.items()}
        share = self.window["data"] / step_seconds if step_seconds > 0 else 0.0
        out["data_wait_fraction"] = share
        if share > DATA_WARN_FRACTION and not self.warned:
            self.warned = True
            logger.warning(
                "Waiting for data took %.0f%% of the step time; raise data.prefetch, prepare "
                "the corpus ahead (jaxlm data prepare), or give the host more CPU.",
                100 * share,
            )
        self.window = dict.fromkeys(PHASES, 0.0)
        return out


def profile_windows(steps: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """`train.profile_steps` as (first, last) step windows: [20, 25] or [[20, 25], [90, 92]]."""
    if not steps:
        return []
    if all(isinstance(s, int) for s in steps):
        return [(int(steps[0]), int(steps[1]))]
    return [(int(a), int(b)) for a, b in steps]


class Profiler:
    """Starts a trace before the first step of each window and stops it after the last.

    A window (a, b) traces steps a..b, numbered from 1 like the logged steps. Only process 0
    traces unless `all_processes`; each process writes its own files under `directory`.
    """

    def __init__(self, windows: list[tuple[int, int]], directory: Path, all_processes: bool):
        active = all_processes or jax.process_index() == 0
        self.windows = windows if active else []
        self.directory = directory
        self.open: tuple[int, int] | None = None

    def before_step(self, step: int) -> None:
        """Called before step `step` (1-based) is dispatched."""
        for a, b in self.windows:
            if step == a and self.open is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                jax.profiler.start_trace(str(self.directory))
                self.open = (a, b)
                logger.info("Profiling steps %d to %d into %s", a, b, self.directory)

    def after_step(self, step: int, state) -> None:
        """Called after step `step` was dispatched; ends a window once the device is done."""
        if self.open is not None and step >= self.open[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.open is not None:
            jax.profiler.stop_trace()
            self.open = None
