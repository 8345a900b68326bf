"""Document filters for corpus preparation: text length bounds and field-value conditions.

A filter sees a document twice: first its record's fields (`keep_record`, for JSONL, Parquet,
Arrow and JSON ArrayRecord inputs), then its text (`admit`, which also drops empty texts). Plain text has no fields, so
a field condition on a text file is an error, not a silent "keep everything".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from jaxlm.errors import ConfigError

FILTER_REASONS = ("filtered_out", "too_short", "too_long")
_MISSING = object()


class Skips(Protocol):
    """What a filter needs of `sources.SkipCounts` (which imports this module)."""

    def add(self, reason: str, where: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class DocFilter:
    """Keep documents of min_chars..max_chars characters whose fields match `where`.

    `where` maps a top-level field to the values it may take: conditions on different
    fields must all hold, several values of one field are alternatives.
    """

    min_chars: int | None = None
    max_chars: int | None = None
    where: Mapping[str, frozenset[str]] = dataclasses.field(default_factory=dict)

    def keep_record(self, get: Callable[[str], object]) -> bool:
        """True when every `where` field (read with `get`, a sentinel when absent) matches."""
        return all(_matches(get(key), values) for key, values in self.where.items())

    def admit(self, text: str, where: str, skips: Skips) -> bool:
        """True to keep `text`; else count it into `skips` as empty, too short or too long."""
        if not text.strip():
            reason = "empty"
        elif self.min_chars is not None and len(text) < self.min_chars:
            reason = "too_short"
        elif self.max_chars is not None and len(text) > self.max_chars:
            reason = "too_long"
        else:
            return True
        skips.add(reason, where)
        return False

    def settings(self) -> dict[str, object]:
        """The manifest settings this filter adds: a change means different shards."""
        where = sorted(f"{k}={v}" for k, values in self.where.items() for v in values)
        return {"min_chars": self.min_chars, "max_chars": self.max_chars, "where": where or None}


NO_FILTER = DocFilter()


def missing() -> object:
    """The value `keep_record`'s getter returns for an absent field."""
    return _MISSING


def _matches(value: object, values: frozenset[str]) -> bool:
    if value is _MISSING or value is None:
        return False
    # Numbers and booleans compare in their JSON spelling, so `year=2020` and `keep=true` work.
    text = value if isinstance(value, str) else json.dumps(value)
    return text in values


def make_filter(
    min_chars: int | None = None, max_chars: int | None = None, where: Sequence[str] = ()
) -> DocFilter:
    """A DocFilter from option values; `where` holds KEY=VALUE strings."""
    for name, value in (("--min-chars", min_chars), ("--max-chars", max_chars)):
        if value is not None and value < 0:
            raise ConfigError(f"{name} {value} must be 0 or more characters.")
    if min_chars is not None and max_chars is not None and min_chars > max_chars:
        raise ConfigError(
            f"--min-chars {min_chars} is above --max-chars {max_chars}; no document could pass."
        )
    conditions: dict[str, set[str]] = {}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--where {item!r} is not KEY=VALUE; write e.g. --where lang=en.")
        conditions.setdefault(key.strip(), set()).add(value)
    return DocFilter(min_chars, max_chars, {k: frozenset(v) for k, v in conditions.items()})
