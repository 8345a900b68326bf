"""Join the processes of a multi-host run with `jax.distributed`, from flags or the environment.

Where the process layout comes from, first match wins:
  1. explicit `--coordinator/--num-processes/--process-id` (local multi-process, anything);
  2. JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (our Kubernetes JobSet);
  3. the cluster environments JAX itself detects: SLURM, Cloud TPU VMs, GKE TPU, Open MPI;
  4. none of these: a single process, and nothing is initialised.
Must run before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm.errors import ConfigError

try:  # the detectors behind a bare jax.distributed.initialize() (a private module)
    from jax._src import clusters as _clusters
except ImportError:  # a JAX that moved them: jax_cluster() still honours SLURM steps
    _clusters = None

INIT_TIMEOUT_S = 300  # how long processes wait for each other at start-up
HEARTBEAT_TIMEOUT_S = 100  # a peer silent this long is declared dead and the job fails
ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How this process joins a run; None fields are left to JAX's cluster detection."""

    source: str  # "explicit" | "env" | a JAX cluster name ("slurm", ...) | "single"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_env(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(
            f"{key}={env[key]!r} must be an integer; fix the launch environment."
        ) from None


def jax_cluster() -> str | None:
    """Name of the first cluster environment JAX's own auto-detection recognises, if any."""
    try:
        cluster_types = list(_clusters.ClusterEnv._cluster_types)
    except AttributeError:  # a JAX that moved them: still honour SLURM steps
        return "slurm" if "SLURM_STEP_NODELIST" in os.environ else None
    with warnings.catch_warnings():  # k8s detection warns in every pod lacking `kubernetes`
        warnings.simplefilter("ignore")
        for cluster in cluster_types:
            if not cluster.opt_in_only_method and cluster.is_env_present():
                return cluster.name or cluster.__name__
    return None


def resolve_layout(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
    cluster: str | None = None,
) -> Layout:
    """Decide where this process's place in the run comes from (see the module docstring).

    `cluster` is what `jax_cluster()` found; it is only consulted when flags and a full set
    of JAX_* variables are absent (JAX itself still reads a lone JAX_COORDINATOR_ADDRESS).
    """
    env = os.environ if env is None else env
    if any(v is not None for v in (coordinator, num_processes, process_id)):
        if coordinator is None or num_processes is None or process_id is None:
            raise ConfigError(
                "--coordinator, --num-processes and --process-id go together; pass all three "
                "(or none, to take them from the environment)."
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process-id={process_id} must lie in [0, {num_processes}) for "
                f"--num-processes={num_processes}."
            )
        return Layout("explicit", coordinator, num_processes, process_id)
    present = [k for k in ENV_KEYS if k in env]
    if present and (len(present) == len(ENV_KEYS) or cluster is None):
        if len(present) != len(ENV_KEYS):
            missing = ", ".join(k for k in ENV_KEYS if k not in env)
            raise ConfigError(f"{', '.join(present)} set without {missing}; set all three or none.")
        n, i = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if not 0 <= i < n:
            raise ConfigError(f"JAX_PROCESS_ID={i} must lie in [0, {n}) for JAX_NUM_PROCESSES={n}.")
        return Layout("env", env["JAX_COORDINATOR_ADDRESS"], n, i)
    # One SLURM task (an salloc shell, `srun -n1`) is a single process: no coordinator needed.
    if cluster is None or (cluster == "slurm" and env.get("SLURM_NTASKS") == "1"):
        return Layout("single")
    return Layout(cluster)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = INIT_TIMEOUT_S,
) -> Layout:
    """Start `jax.distributed` for this process unless it runs alone; returns the layout."""
    explicit = any(v is not None for v in (coordinator, num_processes, process_id))
    in_env = all(k in os.environ for k in ENV_KEYS)
    cluster = None if explicit or in_env else jax_cluster()
    layout = resolve_layout(coordinator, num_processes, process_id, cluster=cluster)
    if layout.source == "single" or layout.num_processes == 1 or jax.distributed.is_initialized():
        return layout
    # Fields left None (a detected cluster) are filled in by JAX's detection of that cluster.
    jax.distributed.initialize(
        coordinator_address=layout.coordinator,
        num_processes=layout.num_processes,
        process_id=layout.process_id,
        initialization_timeout=timeout_s,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    )
    return layout


def to_host(x: jax.Array) -> np.ndarray:
    """An array as numpy on every process, also when its shards live on several hosts.

    Every process must call this for the same arrays in the same order (it is a collective
    when the array is not fully addressable here).
    """
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
