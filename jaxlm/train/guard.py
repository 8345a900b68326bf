"""Guards of a running job: non-finite values, and stop/save decisions all processes share."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.train.state import TrainState

WATCHED = ("loss", "grad_norm")


def skip_nonfinite(step_fn: Callable) -> Callable:
    """Wrap a train step so a non-finite loss or grad norm leaves params and opt state as they were.

    The select runs inside the same compiled step, fused with the update, so the guard costs
    no extra pass or host round trip. The step counter still advances: the batch was consumed,
    and a resumed run must see the same batches at the same steps.
    """

    def guarded(state: TrainState, batch: dict[str, jax.Array]):
        new_state, metrics = step_fn(state, batch)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jnp.where(ok, new, old)
        new_state = new_state.replace(
            params=jax.tree.map(keep, new_state.params, state.params),
            opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        )
        return new_state, {**metrics, "skipped": (~ok).astype(jnp.float32)}

    return guarded


def first_nonfinite(records: list[tuple[int, dict[str, Any]]]) -> tuple[int, str, float] | None:
    """(step, metric, value) of the first record whose loss or grad norm is not finite."""
    for step, values in records:
        for key in WATCHED:
            v = float(values[key])
            if not math.isfinite(v):
                return step, key, v
    return None


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """True if every floating-point leaf of `tree` is finite (one fused reduction)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


class StepBoundary:
    """Decides at each step boundary whether to stop (signal) or save (timer), identically
    on every process.

    A single process reads its own flag and clock at every step: no device work, no
    collective. With several processes, a signal may reach only some of them and clocks
    differ, so the flags must be combined; that all-gather waits for the device to finish the
    steps already dispatched, which costs the host its lead. So the processes agree only at
    steps that are multiples of `agree_every` (the same steps on every process); a signal or
    a due save between two such steps waits for the next one.
    """

    def __init__(
        self, stop: threading.Event | None, every_minutes: float, agree_every: int = 1
    ) -> None:
        self.stop = stop or threading.Event()
        self.interval = every_minutes * 60.0
        self.agree_every = agree_every
        self.last_save = time.monotonic()

    def poll(self, step: int = 0) -> tuple[bool, bool]:
        """(stop now, a timed save is due) after `step`."""
        due = bool(self.interval) and time.monotonic() - self.last_save >= self.interval
        stop = self.stop.is_set()
        if jax.process_count() == 1:
            return stop, due
        if step % self.agree_every:
            return False, False
        flags = multihost_utils.process_allgather(np.asarray([stop, due], np.int32))
        stop, due = (bool(v) for v in np.max(np.asarray(flags), axis=0))
        return stop, due

    def saved(self) -> None:
        """Restart the timer after a save."""
        self.last_save = time.monotonic()
