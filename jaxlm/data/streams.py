"""How many packed streams a run's global batch is cut into: data.streams and its default.

The stream count fixes which documents land in which rows, so it is a property of the run:
it never depends on the process count, and once a run has checkpoints it never changes.

Default for a new run on prepared data: one stream per row (streams = batch_size), or the
largest divisor of the batch size that every source has documents for. Any process count P
that divides the batch then builds batch_size/P streams of its own, and no stream is packed
on two hosts. Building a stream costs a few kB and no reading, and a row is packed the same
way whether its stream yields one row per step or eight (measured in docs/performance.md).
In-memory text keeps one stream: it reproduces the batches of earlier versions.

A run resumed from a checkpoint keeps the count its data position was saved with, read from
the stream indices in that position; earlier versions defaulted to gcd(batch_size, 8) for
prepared data, and such a run resumes with that.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from jaxlm.errors import ConfigError

LEGACY_CAP = 8  # earlier default for prepared data: gcd(batch_size, 8)
# Where the training loop keeps a run's checkpoints, and Grain's per-process position files.
CHECKPOINTS = "checkpoints"
_POSITION = re.compile(r"process_(\d+)-of-(\d+)\.json")


def default_streams(batch_size: int, min_docs: int, prepared: bool) -> int:
    """A new run's stream count: 1 for in-memory text, else the largest divisor of the batch
    size that is at most `min_docs` (the fewest training documents of any source)."""
    if not prepared:
        return 1
    return max(k for k in range(1, batch_size + 1) if batch_size % k == 0 and k <= max(min_docs, 1))


def saved_streams(checkpoints: Path) -> int | None:
    """The stream count of the newest checkpoint whose data position is complete, 0 when
    that position does not tell it (an earlier version's format), None without checkpoints."""
    if not checkpoints.is_dir():
        return None
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), reverse=True)
    for step in steps:
        count = _position_streams(checkpoints / str(step) / "data_iter")
        if count is not None:
            return count
    return None


def _position_streams(directory: Path) -> int | None:
    """Streams of one saved data position (every process's file), or None if incomplete."""
    files = {}
    for path in directory.glob("process_*-of-*.json") if directory.is_dir() else ():
        m = _POSITION.fullmatch(path.name)
        if m:
            files.setdefault(int(m.group(2)), []).append(path)
    complete = [paths for n, paths in files.items() if len(paths) == n]
    if len(complete) != 1:
        return None
    indices: set[int] = set()
    for path in complete[0]:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        streams = saved.get("streams") if isinstance(saved, dict) else None
        if streams is None:  # one stream, its state saved unwrapped
            indices.add(0)
        elif isinstance(streams, dict):  # keyed by global index; together they cover all
            indices.update(int(k) for k in streams)
        else:
            return 0
    return max(indices) + 1


def resolve_streams(
    explicit: int | None, batch_size: int, min_docs: int, prepared: bool, workdir: Path
) -> int:
    """The run's stream count: data.streams, else what its checkpoints hold, else the default."""
    saved = saved_streams(workdir / CHECKPOINTS)
    if explicit:
        if saved and saved != explicit:
            raise ConfigError(
                f"data.streams={explicit} differs from the {saved} stream(s) the checkpoints in "
                f"{workdir} were saved with; set data.streams={saved} (or null) to resume."
            )
        return explicit
    if saved:
        return saved
    if saved == 0:  # a position from an earlier version that does not record its streams
        return math.gcd(batch_size, LEGACY_CAP) if prepared else 1
    return default_streams(batch_size, min_docs, prepared)
