"""What every benchmark reports and how: the environment a number was measured in, XLA's
compiled memory, described TPU slices, and the JSON, markdown and PNG files results go to.

One place, so that `bench attention`, `bench train`, `bench data`, `bench decode` and
`plan` record the same facts and write files of the same shape.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import jax
import jaxlib
from jax.experimental import topologies
from jax.sharding import Mesh

from jaxlm.errors import ConfigError
from jaxlm.perf.peak import cpu_model

# Chips per host of the multi-host slices libtpu describes, by generation.
TPU_CHIPS_PER_HOST = {"v4": (2, 2, 1), "v5p": (2, 2, 1), "v5e": (2, 2, 1), "v6e": (2, 2, 1)}
# (title, result key, format spec) of one markdown table column.
Column = tuple[str, str, str]


def environment(mesh: Mesh | None = None) -> dict[str, Any]:
    """Where, with what and when the numbers were measured (or, with a mesh, compiled for)."""
    dev = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    pallas = "interpret" if dev.platform == "cpu" else "compiled"
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count() if mesh is None else mesh.size,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pallas_mode": pallas if mesh is None else "ahead-of-time compiled only, not run",
    }


def tpu_devices(topology: str, slices: int = 1) -> list:
    """Abstract devices of `slices` TPU slices such as 'v5p:4x4x4', described by libtpu (no
    TPU); devices of several slices carry their `slice_index`."""
    generation, _, shape = topology.partition(":")
    dims = shape.split("x")
    if not shape or not all(d.isdigit() for d in dims):
        raise ConfigError(
            f"TPU topology {topology!r} is not of the form GENERATION:AxB[xC], e.g. v5p:4x4x4."
        )
    # Describing a topology only compiles; don't take libtpu's single-process lock, or a
    # second planner (or test worker) on the same machine fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    bounds = TPU_CHIPS_PER_HOST.get(generation, (2, 2, 1))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology,
            chip_config_name="default",
            chips_per_host_bounds=bounds if len(dims) == 3 else bounds[:2] + (1,),
            num_slices=slices,
        )
    except Exception as e:  # libtpu missing, or a topology it does not know
        raise ConfigError(
            f"Could not describe TPU topology {topology!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); install libtpu with "
            f"pip install 'jax[tpu]=={jax.__version__}' or check the topology name."
        ) from None
    return list(desc.devices)


def peak_bytes(argument: int, output: int, alias: int, temp: int, generated_code: int) -> int:
    """Inputs, outputs that don't reuse donated inputs, temporaries and code, together."""
    return argument + output - alias + temp + generated_code


def memory_analysis(compiled: Any) -> dict[str, int] | None:
    """XLA's compiled memory per device in bytes: argument, output, temp, alias,
    generated_code and their peak; None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    out = {
        k: int(getattr(m, f"{k}_size_in_bytes", 0))
        for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["peak"] = peak_bytes(**out)
    return out


def table(
    columns: Sequence[Column], rows: Iterable[Mapping[str, Any]], right: Sequence[str] = ()
) -> str:
    """A markdown table: one row per result, '-' where a value is missing; the columns
    titled in `right` are right-aligned."""
    lines = [
        "| " + " | ".join(title for title, _, _ in columns) + " |",
        "|" + "".join("---:|" if title in right else "---|" for title, _, _ in columns),
    ]
    for row in rows:
        cells = [
            "-" if row.get(key) is None else format(row[key], spec) for _, key, spec in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(title: str, env: Mapping[str, Any], body: str) -> str:
    """A results file: title, the environment on one line, then the table."""
    facts = ", ".join(f"{k}: {v}" for k, v in env.items())
    return f"# {title}\n\n{facts}\n\n{body}\n"


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path`, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON."""
    return write_text(path, json.dumps(data, indent=1) + "\n")


def write_results(
    path: str | Path, rows: Sequence[Mapping[str, Any]], env: Mapping[str, Any]
) -> Path:
    """A sweep's rows and the environment they were measured in, as one JSON document."""
    return write_json(path, {"environment": dict(env), "results": list(rows)})


def append_table(path: str | Path, preamble: str, lines: Iterable[str]) -> Path:
    """Append rows to a markdown table, writing `preamble` (title, header) if it is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or not path.read_text(encoding="utf-8").strip()
    with open(path, "a", encoding="utf-8") as f:
        f.write(preamble if new else "")
        f.writelines(lines)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (Agg), or None without matplotlib, an
    optional extra (pip install 'jaxlm[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Lay out `fig`, write it to `path` (creating its directory) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
