"""The platform a model is being compiled for, and the speed tricks measured to help there.

Tracing under a mesh whose devices are TPUs (as `jaxlm plan --topology` does on a CPU host)
targets the TPU, not the host, so every backend-specific choice below follows the devices
the program will run on.
"""

from __future__ import annotations

import jax

# Model-code tricks that were measured to pay off on a platform (see docs/performance.md,
# "Backend-specific tricks"); anywhere else the plain formulation is used.
#   stacked_vjp     one matmul for q/k/v (and gate/up) with a hand-written per-kernel backward
#   rotary_barrier  an optimization_barrier that makes XLA build the RoPE tables once
#   blocked_causal  causal `dense` attention in query blocks that skip the masked half
TRICKS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"stacked_vjp", "rotary_barrier", "blocked_causal"}),
    "gpu": frozenset(),  # nothing measured on a GPU yet
    "tpu": frozenset(),  # see the AOT comparison in docs/performance.md
}


def target_backend() -> str:
    """cpu | gpu | tpu: the platform of the ambient mesh's devices (what is being compiled
    for, which `jaxlm plan` makes a TPU on a CPU host), else that of JAX's default device."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    name = jax.default_backend() if device is None else device.platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(name, name)


def uses(trick: str) -> bool:
    """Whether `trick` (a name in TRICKS) applies on the platform being compiled for."""
    return trick in TRICKS.get(target_backend(), frozenset())
