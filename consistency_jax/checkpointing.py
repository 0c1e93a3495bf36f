"""Orbax checkpoints of the train state plus the data iterator's position.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so a run killed mid-save leaves the previous
checkpoints intact. If the newest checkpoint is damaged anyway (disk errors,
files removed by hand), restore falls back to the next older one with a warning.
"""

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    """One CheckpointManager with two items: 'state' (sharded arrays) and 'data' (JSON)."""

    def __init__(self, directory: str, *, keep: int, keep_every: int = 0, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them got a preemption notice (multi-host TPU/GPU)."""
        return self._manager.reached_preemption(step)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores onto the shardings of `abstract_state` (any mesh shape).

        With no step, tries the newest checkpoint first and falls back to older
        ones when a checkpoint cannot be read.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}.")
        errors = []
        for candidate in steps:
            try:
                restored = self._manager.restore(
                    candidate,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                            data=ocp.args.JsonRestore()),
                )
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint means: try an older one
                logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); "
                                "trying the previous one.", candidate, self._manager.directory,
                                type(e).__name__, e)
                errors.append(f"step {candidate}: {type(e).__name__}: {e}")
                continue
            return candidate, restored.state, dict(restored.data or {})
        raise RuntimeError(f"No checkpoint in {self._manager.directory} could be restored:\n" + "\n".join(errors))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
