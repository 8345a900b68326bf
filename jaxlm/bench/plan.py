"""Will this config fit? Parameter count, FLOPs, and per-device memory before booking hardware.

The train step is lowered and compiled ahead of time for the target devices from abstract
arguments that carry their NamedShardings; nothing is allocated. Parameter and optimizer
bytes per device follow exactly from the shardings; activations and other temporaries come
from XLA's memory analysis of the compiled step. The devices are either a described TPU
topology (needs libtpu, no TPU) or fake CPU devices, whose compiled sizes are an estimate
for GPUs. Kernels are picked and lowered for the target devices, not the CPU host: the
model's attention reads the platform from the mesh it is traced under, so a TPU plan
compiles the Mosaic kernels that would run on the TPU (listed in `Plan.kernels`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.bench import report
from jaxlm.config import RunConfig
from jaxlm.data.pipeline import BATCH_KEYS
from jaxlm.errors import ConfigError
from jaxlm.models import build_model
from jaxlm.models.attention_kernels import auto_impl, check_impl
from jaxlm.parallel.sharding import batch_sharding, granules, make_mesh, mesh_shape, validate_mesh
from jaxlm.perf.flops import flops_per_token, inactive_params
from jaxlm.train.optimizer import optimizer_for
from jaxlm.train.state import state_shardings
from jaxlm.train.step import jit_train_step, train_step_for

GIB = 1024**3
# HBM per chip by TPU generation, the default --device-memory-gb for a --topology.
TPU_HBM_GB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}
# A compiled Mosaic kernel in HLO text: `%name.N = ... custom_call_target="tpu_custom_call"`.
_MOSAIC_CALL = re.compile(r'%([\w-]+?)(?:\.\d+)* = [^\n]*custom_call_target="tpu_custom_call"')


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one device holds while the train step runs (bytes) and the model's size."""

    params: int
    flops_per_token: float
    platform: str
    devices: int
    mesh: dict[str, int]
    param_bytes: int  # this device's shards of the parameters
    opt_bytes: int  # ... of the optimizer state
    batch_bytes: int  # ... of one global batch
    temp_bytes: int  # activations, gradients and other temporaries of the compiled step
    argument_bytes: int  # XLA: inputs (state + batch)
    output_bytes: int  # XLA: outputs (new state + metrics)
    alias_bytes: int  # XLA: outputs written over donated inputs
    code_bytes: int  # XLA: generated code
    device_memory_bytes: int | None
    slices: int = 1  # TPU slices the devices span (joined by the data-centre network)
    active_params: int | None = None  # a mixture of experts: parameters each token uses
    attention: str = ""  # the implementation the step uses on these devices (auto resolved)
    kernels: tuple[str, ...] = ()  # Mosaic (TPU) kernels compiled into the step, by name
    # XLA's cost analysis: bytes the program touches (a scanned loop's body counted once).
    bytes_accessed: float | None = None

    @property
    def peak_bytes(self) -> int:
        """Inputs, outputs that don't reuse donated inputs, temporaries and code, together."""
        return report.peak_bytes(
            self.argument_bytes,
            self.output_bytes,
            self.alias_bytes,
            self.temp_bytes,
            self.code_bytes,
        )

    @property
    def fits(self) -> bool | None:
        """None when no device memory was given."""
        if self.device_memory_bytes is None:
            return None
        return self.peak_bytes <= self.device_memory_bytes


def default_device_memory(topology: str | None) -> int | None:
    """HBM per chip of a known TPU generation, in bytes."""
    if topology is None:
        return None
    gb = TPU_HBM_GB.get(topology.partition(":")[0])
    return None if gb is None else gb * GIB


def _shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes of one device's shards of a tree (the largest, if shards differ)."""
    sizes = [
        math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    ]
    return sum(sizes)


def mosaic_kernels(hlo_text: str) -> tuple[str, ...]:
    """Names of the compiled Mosaic kernels (TPU custom calls) in HLO text, sorted.

    A Pallas kernel lowered in interpret mode leaves none: its body becomes XLA loops.
    """
    return tuple(sorted(_MOSAIC_CALL.findall(hlo_text)))


def attention_for(cfg: RunConfig, platform: str) -> str:
    """The attention implementation the model uses on `platform` (checked, auto resolved)."""
    m = cfg.model
    if m.recurrent:
        return ""
    check_impl(m.attention, platform)
    if m.attention != "auto":
        return m.attention
    seq = cfg.data.seq_len
    return auto_impl(platform, jnp.dtype(m.dtype), m.head_dim, seq, seq)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def make_plan(cfg: RunConfig, devices: list, device_memory_bytes: int | None = None) -> Plan:
    """Compile the train step for `devices` from abstract sharded inputs and measure it."""
    t, m, seq = cfg.train, cfg.model, cfg.data.seq_len
    mesh = make_mesh(cfg.mesh, devices)
    validate_mesh(cfg, mesh)
    kind, n = granules(devices)
    attention = attention_for(cfg, devices[0].platform)  # a bad choice fails before compiling
    model = build_model(m)
    tx = optimizer_for(cfg, t.steps)
    abstract, shardings = state_shardings(model, tx, seq, mesh)
    step = train_step_for(cfg, model, tx)
    rows = batch_sharding(mesh)
    batch = {
        k: jax.ShapeDtypeStruct(
            (t.batch_size, seq), jnp.float32 if k == "weights" else jnp.int32, sharding=rows
        )
        for k in BATCH_KEYS
    }
    lowered = jit_train_step(step, shardings, mesh).lower(_abstract(abstract, shardings), batch)
    compiled = _compile(lowered)
    mem = report.memory_analysis(compiled)
    if mem is None:
        raise ConfigError(
            f"XLA gives no memory analysis for {devices[0].platform} devices; plan for CPU "
            "devices (--devices N) or a TPU topology (--topology) instead."
        )
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    return Plan(
        params=total,
        flops_per_token=flops_per_token(m, seq),
        platform=devices[0].platform,
        devices=len(devices),
        mesh=dict(mesh.shape),
        param_bytes=_shard_bytes(abstract.params, shardings.params),
        opt_bytes=_shard_bytes(abstract.opt_state, shardings.opt_state),
        batch_bytes=_shard_bytes(batch, jax.tree.map(lambda x: x.sharding, batch)),
        temp_bytes=mem["temp"],
        argument_bytes=mem["argument"],
        output_bytes=mem["output"],
        alias_bytes=mem["alias"],
        code_bytes=mem["generated_code"],
        device_memory_bytes=device_memory_bytes,
        slices=n if kind == "slices" else 1,
        active_params=total - inactive_params(m) if m.moe_experts else None,
        attention=attention,
        kernels=mosaic_kernels(compiled.as_text()) if devices[0].platform == "tpu" else (),
        bytes_accessed=_bytes_accessed(compiled),
    )


class CompileOutOfMemory(Exception):
    """The target's compiler refused the step: its HBM temporaries, or one kernel's scoped
    VMEM, exceed what the chip has."""

    def __init__(
        self, required_bytes: int | None, available_bytes: int | None, kernel: str | None = None
    ) -> None:
        self.required_bytes, self.available_bytes = required_bytes, available_bytes
        self.kernel = kernel
        if kernel is not None:  # Mosaic kernels hold their blocks in on-chip VMEM
            need = "?" if required_bytes is None else f"{required_bytes / 2**20:.1f} MiB"
            has = "?" if available_bytes is None else f"{available_bytes / 2**20:.1f} MiB"
            message = (
                f"does not fit: kernel {kernel} needs {need} of scoped VMEM, over the {has} "
                "limit; shorten the sequence each device holds or use another model.attention "
                "(auto picks splash on TPU)."
            )
        else:
            need = "?" if required_bytes is None else f"{required_bytes / GIB:.2f} GiB"
            has = "?" if available_bytes is None else f"{available_bytes / GIB:.2f} GiB"
            message = (
                f"does not fit: the compiler needs {need} of temporaries per device and the "
                f"chip has {has}; lower data.seq_len or train.batch_size, or add devices or remat."
            )
        super().__init__(message)


def _gib_in(text: str, label: str) -> int | None:
    found = re.search(label + r"[^(]*\(([0-9.]+)G\)", text)
    return None if found is None else int(float(found.group(1)) * GIB)


def _vmem_oom(text: str) -> CompileOutOfMemory | None:
    """XLA:TPU's "CompileTimeScopedVmemOom" refusal, read: kernel, size and limit."""
    if "vmem" not in text.lower():
        return None
    kernel = re.search(r"%(\w+?)(?:\.\d+)? =", text)  # the custom call's HLO name
    sizes = re.search(r"size ([0-9.]+)M and limit ([0-9.]+)M", text)
    need, limit = (int(float(x) * 2**20) for x in sizes.groups()) if sizes else (None, None)
    return CompileOutOfMemory(need, limit, kernel.group(1) if kernel else "?")


def _compile(lowered: Any) -> Any:
    """lowered.compile(); TPU's out-of-memory refusal becomes CompileOutOfMemory."""
    # XLA:TPU refuses to compile a program whose buffers exceed HBM (or a kernel's VMEM),
    # where XLA:CPU compiles anything; the refusal answers "does it fit", it is no crash.
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        raise _vmem_oom(text) or CompileOutOfMemory(
            _gib_in(text, "required"), _gib_in(text, "available")
        ) from None


def _bytes_accessed(compiled: Any) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list) else cost  # older JAX: one dict per program
    return None if not cost or "bytes accessed" not in cost else float(cost["bytes accessed"])


def cpu_device_count(cfg: RunConfig, devices: int | None) -> int:
    """How many fake CPU devices to make: --devices, or the product of fixed mesh sizes."""
    sizes = [getattr(cfg.mesh, a) for a in ("data", "fsdp", "tensor", "sequence", "expert")]
    if devices is not None:
        mesh_shape(cfg.mesh, devices)  # refuse a count the mesh can't use, in one sentence
        return devices
    if -1 in sizes:
        raise ConfigError(
            "A mesh axis is -1, so the device count is unknown; pass --devices N or --topology."
        )
    return math.prod(sizes)


def target_devices(
    cfg: RunConfig, topology: str | None, devices: int | None, slices: int | None = None
) -> list:
    """The devices to compile for; must run before anything else initialises JAX.

    JAX is kept on CPU either way: a TPU slice is only described, never opened, so a plan
    can run beside a training job that holds the local accelerators.
    """
    if slices is not None and topology is None:
        raise ConfigError(
            f"--slices {slices} needs a TPU --topology (fake CPU devices have no slices); "
            "add e.g. --topology v5p:4x4x4 or drop --slices."
        )
    if slices is not None and slices < 1:
        raise ConfigError(f"--slices {slices} must be at least 1 (the number of TPU slices).")
    jax.config.update("jax_platforms", "cpu")
    if topology is not None:
        return report.tpu_devices(topology, slices or 1)
    jax.config.update("jax_num_cpu_devices", cpu_device_count(cfg, devices))
    return jax.devices()


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:9.2f} {unit}"
    return f"{n:9d} B"


def _kernel_note(p: Plan) -> str:
    """` (3 Mosaic kernel calls: flash_dkv, flash_dq, flash_fwd)` on TPU; blank elsewhere."""
    if p.platform != "tpu":
        return ""
    names = sorted(set(p.kernels))
    return f" ({len(p.kernels)} Mosaic kernel calls: {', '.join(names) or 'none'})"


def format_plan(p: Plan) -> str:
    """The plan as a short human-readable report."""
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    slices = f" in {p.slices} slices" if p.slices > 1 else ""
    lines = [
        f"parameters          {p.params:,} ({p.params / 1e6:.2f}M)",
        *(
            [f"  active per token  {p.active_params:,} ({p.active_params / 1e6:.2f}M)"]
            if p.active_params is not None
            else []
        ),
        f"FLOPs per token     {p.flops_per_token:.4g} (training)",
        f"devices             {p.devices} x {p.platform}{slices}, mesh {mesh}",
        *([f"attention           {p.attention}{_kernel_note(p)}"] if p.attention else []),
        "per device:",
        f"  parameters        {_size(p.param_bytes)}",
        f"  optimizer state   {_size(p.opt_bytes)}",
        f"  batch             {_size(p.batch_bytes)}",
        f"  inputs            {_size(p.argument_bytes)}   (XLA: the three above, padded)",
        f"  activations/temp  {_size(p.temp_bytes)}   (XLA memory analysis)",
        f"  peak              {_size(p.peak_bytes)}   (inputs + new outputs + temp + code)",
    ]
    if p.device_memory_bytes is None:
        lines.append("fits                unknown (pass --device-memory-gb)")
    else:
        verdict = "yes" if p.fits else "NO"
        lines.append(
            f"fits                {verdict}: {_size(p.device_memory_bytes).strip()} per device"
        )
    return "\n".join(lines)


def plan_dict(p: Plan) -> dict[str, Any]:
    """The plan as plain JSON-able data, derived fields included."""
    return {**dataclasses.asdict(p), "peak_bytes": p.peak_bytes, "fits": p.fits}
