"""The longest sequence a config trains at on a set of devices: bisection over data.seq_len.

Each probe is one ahead-of-time compile of the real train step (`plan.make_plan`), so the
answer accounts for everything XLA keeps alive (activations, remat, attention temporaries,
the loss), not a formula. The search doubles the length from the config's own until a
compile no longer fits, then bisects between the last fit and the first miss down to a
granule, so it costs about log2(longest / start) + log2(gap / granule) compiles.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from jaxlm.bench.plan import GIB, CompileOutOfMemory, Plan, make_plan
from jaxlm.config import RunConfig
from jaxlm.errors import ConfigError

logger = logging.getLogger(__name__)

# Beyond this the question is no longer "how long can I train" but a different job.
MAX_SEQ_LEN = 1 << 22


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compiled length and whether its peak fits the device memory."""

    seq_len: int
    peak_bytes: int  # for a compile the target refused: the temporaries it asked for
    fits: bool


@dataclasses.dataclass(frozen=True)
class LongestSequence:
    """The search's answer: the longest fitting length (0 if none) and every probe made."""

    seq_len: int
    plan: Plan | None  # the plan at `seq_len`
    probes: list[Probe]
    granule: int
    device_memory_bytes: int


def with_seq_len(cfg: RunConfig, seq_len: int) -> RunConfig:
    """The config with data.seq_len (and model.max_seq_len, when it is shorter) at `seq_len`."""
    model = cfg.model
    if not model.recurrent and model.max_seq_len < seq_len:
        model = dataclasses.replace(model, max_seq_len=seq_len)
    return dataclasses.replace(
        cfg, model=model, data=dataclasses.replace(cfg.data, seq_len=seq_len)
    )


def default_granule(cfg: RunConfig) -> int:
    """Lengths are searched in multiples of this: 512 tokens per sequence device, at least."""
    sequence = max(cfg.mesh.sequence, 1)
    return 512 * sequence


def longest_sequence(
    cfg: RunConfig,
    devices: list,
    device_memory_bytes: int,
    granule: int | None = None,
    compile_plan: Callable[[RunConfig, list, int], Plan] = make_plan,
) -> LongestSequence:
    """Bisect data.seq_len for the longest length whose compiled step fits the memory.

    `compile_plan` is `make_plan` (tests may pass a cheaper stand-in with the same contract).
    """
    granule = granule or default_granule(cfg)
    if granule < 1:
        raise ConfigError(f"--seq-granule {granule} must be at least 1 token.")
    if device_memory_bytes is None or device_memory_bytes <= 0:
        raise ConfigError(
            "--longest-seq needs the device memory: pass --device-memory-gb or a TPU --topology."
        )
    probes: list[Probe] = []
    plans: dict[int, Plan] = {}

    def fits(seq_len: int) -> bool:
        try:
            p = compile_plan(with_seq_len(cfg, seq_len), devices, device_memory_bytes)
        except CompileOutOfMemory as e:  # the TPU compiler's own "no"
            probes.append(Probe(seq_len, e.required_bytes or 0, False))
            logger.info("seq_len %d: %s", seq_len, e)
            return False
        probes.append(Probe(seq_len, p.peak_bytes, bool(p.fits)))
        logger.info(
            "seq_len %d: peak %.2f GiB, %s",
            seq_len, p.peak_bytes / GIB, "fits" if p.fits else "does not fit",
        )  # fmt: skip
        if p.fits:
            plans[seq_len] = p
        return bool(p.fits)

    start = max(granule, cfg.data.seq_len // granule * granule)
    lo, hi = 0, None  # lo fits (0: nothing yet); hi does not fit
    n = start
    while n <= MAX_SEQ_LEN:
        if fits(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:
        hi = min(n, MAX_SEQ_LEN + granule)
    if lo == 0:  # the first probe missed: search below it
        lo_units = 0
    else:
        lo_units = lo // granule
    hi_units = hi // granule
    while hi_units - lo_units > 1:
        mid = (lo_units + hi_units) // 2
        if fits(mid * granule):
            lo_units = mid
        else:
            hi_units = mid
    best = lo_units * granule
    return LongestSequence(best, plans.get(best), probes, granule, device_memory_bytes)


def format_longest(result: LongestSequence) -> str:
    """The search as a short report: each probe, then the answer."""
    lines = ["seq_len     peak per device   fits"]
    for p in sorted(result.probes, key=lambda p: p.seq_len):
        lines.append(
            f"{p.seq_len:>8,}   {p.peak_bytes / GIB:10.2f} GiB    {'yes' if p.fits else 'no'}"
        )
    memory = result.device_memory_bytes / GIB
    if result.seq_len:
        lines.append(
            f"longest sequence    {result.seq_len:,} tokens (granule {result.granule:,}; "
            f"{memory:.1f} GiB per device, {len(result.probes)} compiles)"
        )
    else:
        lines.append(
            f"longest sequence    none: even {result.granule:,} tokens needs more than "
            f"{memory:.1f} GiB per device"
        )
    return "\n".join(lines)


def longest_dict(result: LongestSequence) -> dict:
    """The search as plain JSON-able data."""
    return {
        "longest_seq_len": result.seq_len,
        "granule": result.granule,
        "device_memory_bytes": result.device_memory_bytes,
        "probes": [dataclasses.asdict(p) for p in result.probes],
    }
