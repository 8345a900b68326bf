"""A process's rows of each global batch: its streams, stacked step by step, built here or
in Grain worker processes.

Each stream a process builds is an independent packed stream (pipeline._stream_rows), so the
streams can be read and packed anywhere. With `workers` > 0 they are dealt round-robin to
that many worker processes (Grain's mp_prefetch); each worker yields its streams' rows and
their states after the step, and this process puts the rows back in stream order. The batches
are therefore those of the in-process path, and the saved state has the same form either way
(stream index -> stream state), so a run may change its worker count when it resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxlm.errors import ConfigError

BuildStream = Callable[[int], grain.IterDataset]


class RowBlocks(grain.IterDataset):
    """Stacks `rows` rows of each stream in `indices`, step by step, into one batch.

    Its iterator's state maps each stream's global index to that stream's state, so it does
    not depend on how many processes share the batch: a checkpoint's states, merged over the
    processes that wrote it, restore any other split of the streams (elastic resume). The
    streams are built when iterated, in whichever process iterates.
    """

    def __init__(
        self,
        build: BuildStream,
        indices: list[int],
        rows: int,
        initial: dict[str, Any] | None = None,
        with_state: bool = False,
    ) -> None:
        super().__init__()
        self._build, self._indices, self._rows = build, list(indices), rows
        self._initial, self._with_state = initial, with_state

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Keep only the streams `sl` selects: Grain calls this in each worker process."""
        self._indices = self._indices[sl]

    def __iter__(self) -> grain.DatasetIterator:
        it = _RowBlocksIterator(self._indices, [self._build(k) for k in self._indices], self)
        if self._initial is not None:
            it.set_state(self._initial)
        return it

    def __str__(self) -> str:
        return f"RowBlocks(streams={self._indices}, rows={self._rows})"


class _RowBlocksIterator(grain.DatasetIterator):
    """Iterator side of RowBlocks."""

    def __init__(self, indices: list[int], blocks: list[grain.IterDataset], ds: RowBlocks):
        parents = [b.__iter__() for b in blocks]
        super().__init__(parents)
        self._indices, self._streams = indices, parents
        self._rows, self._with_state = ds._rows, ds._with_state

    def __next__(self) -> dict[str, Any]:
        # One stack per step rather than a Grain batch per stream: with a stream per row the
        # per-stream batching cost about a third of the pipeline's time.
        rows = [next(it) for it in self._streams for _ in range(self._rows)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        # A worker sends the state after this step with its rows: the main process then
        # knows every stream's position without asking the workers.
        return {"rows": batch, "state": self.get_state()} if self._with_state else batch

    def get_state(self) -> dict[str, Any]:
        return {
            "streams": {
                str(k): it.get_state() for k, it in zip(self._indices, self._streams, strict=True)
            }
        }

    def set_state(self, state: dict[str, Any]) -> None:
        streams = state.get("streams")
        if isinstance(streams, list):  # earlier versions: this process's streams, in order
            states = dict(zip(self._indices, streams, strict=True))
        elif streams is None:  # earlier versions with one stream: its own state, unwrapped
            states = {self._indices[0]: state}
        else:
            missing = [k for k in self._indices if str(k) not in streams]
            if missing:
                raise ConfigError(
                    f"The saved data position holds no state for stream(s) {missing}; resume "
                    "with the data.streams and train.batch_size the run was trained with."
                )
            states = {k: streams[str(k)] for k in self._indices}
        for k, it in zip(self._indices, self._streams, strict=True):
            it.set_state(states[k])


class WorkerRows(grain.IterDataset):
    """RowBlocks whose streams are read and packed in `workers` Grain worker processes."""

    def __init__(self, build: BuildStream, indices: list[int], rows: int, workers: int) -> None:
        super().__init__()
        self._build, self._indices, self._rows = build, list(indices), rows
        self._workers = max(1, min(workers, len(self._indices)))  # no worker without a stream

    def __iter__(self) -> grain.DatasetIterator:
        return _WorkerRowsIterator(self)

    def __str__(self) -> str:
        return f"WorkerRows(streams={self._indices}, workers={self._workers})"


def _flags_parsed(*_: int) -> None:
    # Grain reads its absl flags in the main process and in each worker; a library caller
    # (or pytest) has not parsed them, and reading unparsed flags raises.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _WorkerRowsIterator(grain.DatasetIterator):
    """Iterator side of WorkerRows; the workers start at the first batch asked for."""

    def __init__(self, ds: WorkerRows) -> None:
        super().__init__()
        self._ds, self._it, self._state = ds, None, None
        # Worker j % W holds local stream j, as the j // W-th of its own streams.
        w = ds._workers
        self._where = [(j % w, j // w) for j in range(len(ds._indices))]

    def _in_process(self) -> _RowBlocksIterator:
        ds = self._ds
        return RowBlocks(ds._build, ds._indices, ds._rows).__iter__()

    def _start(self) -> None:
        ds = self._ds
        _flags_parsed()
        blocks = RowBlocks(ds._build, ds._indices, ds._rows, self._state, with_state=True)
        options = grain.MultiprocessingOptions(num_workers=ds._workers, per_worker_buffer_size=2)
        self._it = blocks.mp_prefetch(options, worker_init_fn=_flags_parsed).__iter__()

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        parts = [next(self._it) for _ in range(self._ds._workers)]  # round-robin over workers
        r = self._ds._rows
        batch = {
            key: np.concatenate(
                [parts[w]["rows"][key][i * r : (i + 1) * r] for w, i in self._where]
            )
            for key in parts[0]["rows"]
        }
        streams: dict[str, Any] = {}
        for p in parts:
            streams.update(p["state"]["streams"])
        self._state = {"streams": {str(k): streams[str(k)] for k in self._ds._indices}}
        return batch

    def get_state(self) -> dict[str, Any]:
        if self._state is None:  # nothing read yet: every stream at its start
            self._state = self._in_process().get_state()
        return self._state

    def set_state(self, state: dict[str, Any]) -> None:
        # Checked and narrowed to this process's streams here, where a bad state raises
        # its own error; the workers then start (again) from it.
        it = self._in_process()
        it.set_state(state)
        self.close()
        self._state = it.get_state()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._it is not None:
            self._it.close()
            self._it = None
