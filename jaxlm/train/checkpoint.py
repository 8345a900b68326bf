"""Orbax checkpoints: train state + Grain data-iterator position + resolved config, together.

Saves are asynchronous and atomic: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*`
and renames it when every item is on disk, so a crash mid-save leaves only a temporary
directory that is never mistaken for a checkpoint. In a bucket (gs://, s3://), which can't
rename a directory, a step counts once its `commit_success.txt` is written
(`train.object_store`). Restore takes an abstract target carrying
the *current* shardings, so a checkpoint written on one mesh comes back onto another.

A step that exists but can't be read (a truncated or missing file) is reported and skipped
in favour of the newest readable one, and so is a step whose bytes no longer match the
checksums taken once it committed (`train.integrity`). Training runs move such steps, and the
temporary directories of interrupted saves, into `checkpoints.damaged/` beside the
checkpoints: out of the way of new saves, yet nothing the user did not ask to delete is deleted.

Checksums are taken by process 0 alone, after the commit: the step directory is then complete
whichever process wrote which file (on the shared storage every multi-host Orbax run needs),
and hashing it in a background thread keeps saving asynchronous. Processes thus never have
to agree on a per-process record, and the one verdict at restore is shared like any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxlm.config import CheckpointConfig
from jaxlm.errors import ConfigError
from jaxlm.paths import Path, as_path, is_remote, move
from jaxlm.train import object_store
from jaxlm.train.integrity import DamagedCheckpoint, verify_checksums, write_checksums

logger = logging.getLogger(__name__)

ITEMS = ("state", "data_iter", "config")
TMP_MARKER = ".orbax-checkpoint-tmp"


@dataclasses.dataclass
class Restored:
    """What `restore_latest` found: the step, its train state and its saved config."""

    step: int
    state: Any
    config: dict[str, Any]


class Checkpointer:
    """A thin, typed face over `ocp.CheckpointManager` for jaxlm runs."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False):
        self.directory = as_path(directory, "the checkpoint directory")
        if not is_remote(self.directory):
            self.directory = self.directory.absolute()
        object_store.prepare(self.directory)
        self.damaged_dir = self.directory.parent / (self.directory.name + ".damaged")
        self.read_only = read_only
        self._unsealed: list[int] = []  # saved steps whose checksums are not yet written
        self._hasher: threading.Thread | None = None
        self._verified: set[int] = set()
        keep: list[Any] = [policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else 1,  # the loop decides when to save
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            # object stores: a step counts once its commit file is written (no dir rename)
            temporary_path_class=object_store.temporary_path_class(str(self.directory)),
        )
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # Orbax warns that a read-only manager is read-only; we asked for it
            absl_logger.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        finally:
            absl_logger.setLevel(level)

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (readable or not)."""
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None for a fresh run."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: dict[str, Any]) -> None:
        """Start saving (returns while the write continues in the background)."""
        args = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(config),
        }
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self._seal(background=True)  # the previous save commits before this one starts anyway
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._unsealed.append(step)

    def _seal(self, background: bool) -> None:
        """Once the saves in flight have committed, checksum them (process 0 only)."""
        if self._hasher is not None:
            self._hasher.join()
            self._hasher = None
        if not self._unsealed:
            return
        self.manager.wait_until_finished()
        steps, self._unsealed = self._unsealed, []
        if jax.process_index() != 0 or is_remote(self.directory):
            return  # an object store keeps its own per-object checksums; no re-read of a save
        if background:
            self._hasher = threading.Thread(
                target=self._write_checksums, args=(steps,), name="jaxlm-checksums"
            )
            self._hasher.start()
        else:
            self._write_checksums(steps)

    def _write_checksums(self, steps: list[int]) -> None:
        for step in steps:
            step_dir = self.directory / str(step)
            try:
                write_checksums(step_dir)
            except OSError as e:  # e.g. a keep policy deleted the step meanwhile
                if step_dir.is_dir():
                    logger.warning("No checksums for checkpoint step %d: %s", step, e)

    def verify(self, step: int) -> None:
        """Raise DamagedCheckpoint if a file of `step` differs from its saved checksum."""
        try:
            self._check(step)
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(
                f"Checkpoint step {step} in {self.directory} is damaged ({e}); restore an "
                f"older step, or move that step's directory away."
            ) from None

    def _check(self, step: int) -> None:
        if step not in self._verified and not is_remote(self.directory):
            verify_checksums(self.directory / str(step))
            self._verified.add(step)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restore the state onto the shardings in `abstract_state`; advance `data_iter`."""
        self.verify(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self.manager.restore(step, args=args)["state"]
        if data_iter is not None:
            data_iter.set_state(self._data_position(step))
        return state

    def _data_position(self, step: int) -> dict[str, Any]:
        """This process's data-iterator state at `step`, whatever the process count then.

        Each process saved its iterator's state as `process_I-of-N.json` (Grain's handler).
        With the same process count, this process's own file is used as written. Otherwise
        the per-stream states of every file are merged: streams are addressed by their global
        index, so each process of a resized job finds the streams it now builds.
        """
        directory = self.directory / str(step) / "data_iter"
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.is_file():
            return json.loads(own.read_text(encoding="utf-8"))
        files = sorted(directory.glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no data position")
        streams: dict[str, Any] = {}
        for path in files:
            saved = json.loads(path.read_text(encoding="utf-8")).get("streams")
            if not isinstance(saved, dict):
                raise ConfigError(
                    f"Checkpoint step {step} in {self.directory} was written by {len(files)} "
                    f"processes with an earlier jaxlm, whose data position resumes only on as "
                    f"many; start {len(files)} processes (or train anew in another --workdir)."
                )
            streams.update(saved)
        return {"streams": streams}

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restore only the parameters (no optimizer state is read) onto their shardings."""
        self.verify(step)
        item = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

    def restore_config(self, step: int) -> dict[str, Any]:
        """The resolved config a checkpoint was written with."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def restore_latest(
        self,
        abstract_state: Any,
        data_iter: Any = None,
        *,
        check_config: Callable[[dict[str, Any]], None] | None = None,
        move_damaged: bool = False,
        params_only: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Restored | None:
        """Restore the newest readable step (None if there is no checkpoint at all).

        `check_config` sees each candidate's saved config before its state is read, so a
        config that can't resume is refused (ConfigError) rather than mistaken for damage.
        With `params_only`, `abstract_state` is the parameter tree and so is `state`.
        `log` receives what was skipped or moved (default: this module's logger).
        """
        log = log or logger.warning
        if move_damaged:
            self._move_interrupted_saves(log)
        steps = self.all_steps()
        damaged: list[int] = []
        for step in reversed(steps):
            config, state, error = None, None, None
            try:
                if jax.process_index() == 0:  # one reading suffices; the verdict is shared
                    self._check(step)
                else:
                    self._verified.add(step)
                config = self.restore_config(step)
            except Exception as e:  # any failure to read it means "damaged"
                error = e
            if _everywhere(config is not None):
                if check_config is not None:
                    check_config(config)
                try:
                    if params_only:
                        state = self.restore_params(step, abstract_state)
                    else:
                        state = self.restore(step, abstract_state, data_iter)
                except ConfigError:
                    raise  # readable, but not by this job as started: the user must act
                except Exception as e:  # (tensorstore raises plain Exceptions)
                    error = e
            if _everywhere(state is not None):
                if damaged and move_damaged:
                    self._move_aside(damaged, log)
                return Restored(step=step, state=state, config=config)
            damaged.append(step)
            log(
                f"Checkpoint step {step} in {self.directory} is damaged or unreadable "
                f"({_first_line(error)}); trying an older one."
            )
        if damaged:
            raise ConfigError(
                f"None of the checkpoints in {self.directory} (steps "
                f"{', '.join(map(str, steps))}) can be read; move that directory away to "
                f"start the run afresh."
            )
        return None

    def _move_interrupted_saves(self, log: Callable[[str], None]) -> None:
        """Move temporary directories of saves that never committed out of the way."""
        if jax.process_index() == 0 and self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if TMP_MARKER in path.name or (
                    is_remote(path) and path.name.isdigit() and not object_store.is_committed(path)
                ):
                    dest = self._park(path)
                    log(f"An interrupted save ({path.name}) was moved to {dest}.")
        _sync("jaxlm_checkpoint_tmp")

    def _move_aside(self, steps: list[int], log: Callable[[str], None]) -> None:
        """Move damaged steps into the damaged directory (process 0), then re-scan."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in steps:
                dest = self._park(self.directory / str(step))
                log(f"Moved unreadable checkpoint step {step} to {dest}.")
        _sync("jaxlm_checkpoint_damaged")
        self.manager.reload()

    def _park(self, path: Path) -> Path:
        self.damaged_dir.mkdir(parents=True, exist_ok=True)
        dest = self.damaged_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while dest.exists():
            dest = dest.with_name(dest.name + "+")
        move(path, dest)
        return dest

    def wait(self) -> None:
        """Block until any background save has committed and been checksummed."""
        self._seal(background=False)
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish background saves (and their checksums) and release the manager."""
        self._seal(background=False)
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores onto)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _everywhere(ok: bool) -> bool:
    """True only if `ok` holds on every process (so all pick the same checkpoint)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return "unreadable on another process"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__
