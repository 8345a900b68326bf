"""The NaN guard and the step boundary: a non-finite step is skipped, signals and the timer
ask for a stop or a save."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.train import guard
from jaxlm.train.guard import StepBoundary, skip_nonfinite, tree_all_finite
from jaxlm.train.step import make_train_step

S = 16  # tiny_run_config's sequence length


def _batch(weight: float) -> dict[str, jnp.ndarray]:
    tokens = (jnp.arange(2 * S).reshape(2, S) * 7) % 300
    ones = jnp.ones((2, S), jnp.int32)
    return {
        "inputs": tokens,
        "targets": (tokens + 1) % 300,
        "segment_ids": ones,
        "positions": jnp.broadcast_to(jnp.arange(S), (2, S)),
        "weights": jnp.full((2, S), weight, jnp.float32),
    }


def test_skip_policy_keeps_params_and_opt_state_on_nonfinite_loss(tiny_state):
    _, model, tx, state = tiny_state
    step = jax.jit(skip_nonfinite(make_train_step(model, tx)))
    same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))

    bad_state, bad = step(state, _batch(jnp.nan))  # NaN weights: NaN loss and gradients
    assert not np.isfinite(bad["loss"]) and float(bad["skipped"]) == 1.0
    assert same(bad_state.params, state.params) and same(bad_state.opt_state, state.opt_state)
    assert int(bad_state.step) == int(state.step) + 1  # the batch was consumed all the same

    good_state, good = step(state, _batch(1.0))
    assert np.isfinite(good["loss"]) and float(good["skipped"]) == 0.0
    assert not same(good_state.params, state.params)


def test_tree_all_finite():
    tree = {"w": jnp.ones((3,)), "n": jnp.arange(3), "s": jnp.float32(2.0)}
    assert bool(tree_all_finite(tree))
    assert not bool(tree_all_finite({**tree, "w": jnp.array([1.0, jnp.inf, 0.0])}))
    assert not bool(tree_all_finite({**tree, "s": jnp.float32(jnp.nan)}))


def test_step_boundary_reports_signals_and_due_timed_saves(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: now[0])
    stop = threading.Event()
    boundary = StepBoundary(stop, every_minutes=2.0)
    assert boundary.poll() == (False, False)
    now[0] += 119.0
    assert boundary.poll() == (False, False)
    now[0] += 1.0
    assert boundary.poll() == (False, True)
    boundary.saved()
    assert boundary.poll() == (False, False)
    stop.set()
    assert boundary.poll() == (True, False)
    now[0] += 1e6
    assert StepBoundary(None, every_minutes=0.0).poll() == (False, False)  # timer off


def test_processes_agree_only_every_agree_every_steps(monkeypatch):
    # With several processes the flags are combined by a collective that waits for the
    # device; it must run at the multiples of agree_every only, the same steps everywhere.
    gathered = []

    def allgather(flags):
        gathered.append(flags.tolist())
        return np.stack([flags, np.asarray([0, 1], np.int32)])  # the other process: save due

    monkeypatch.setattr(guard.jax, "process_count", lambda: 2)
    monkeypatch.setattr(guard.multihost_utils, "process_allgather", allgather)
    stop = threading.Event()
    boundary = StepBoundary(stop, every_minutes=0.0, agree_every=4)
    stop.set()
    polls = [boundary.poll(step) for step in range(1, 9)]
    assert polls == [(False, False)] * 3 + [(True, True)] + [(False, False)] * 3 + [(True, True)]
    assert gathered == [[1, 0], [1, 0]]  # steps 4 and 8 only
