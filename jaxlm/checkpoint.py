"""Orbax checkpoints: train state + Grain data-iterator position + resolved config, together.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it on
commit), and restore takes an abstract target carrying the *current* shardings, so a
checkpoint written on one mesh comes back onto another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig

ITEMS = ("state", "data_iter", "config")


class Checkpointer:
    """A thin, typed face over `ocp.CheckpointManager` for jaxlm runs."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=1,  # the loop decides when to save
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

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
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restore the state onto the shardings in `abstract_state`; advance `data_iter`."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_config(self, step: int) -> dict[str, Any]:
        """The resolved config a checkpoint was written with."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return restored["config"]

    def wait(self) -> None:
        """Block until any background save has committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores onto)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
