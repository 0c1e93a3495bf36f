"""Orbax checkpoints of the train state plus the data iterator's position.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so a run killed mid-save leaves the previous
checkpoints intact; the next run removes the unfinished temporary directory.
If the newest checkpoint is damaged anyway (disk errors, files removed by
hand), restore falls back to the next older one with a warning and moves the
damaged ones aside (to `unreadable_<step>`), so that the resumed run can save
those steps again.
"""

from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

UNREADABLE_PREFIX = "unreadable_"


class Checkpointer:
    """One CheckpointManager with two items: 'state' (sharded arrays) and 'data' (JSON)."""

    def __init__(self, directory: str, *, keep: int = 1, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` opens another run's checkpoints (a teacher's) without touching its directory."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that a kill interrupted
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
        """Restores the whole state onto the shardings of `abstract_state` (any mesh shape), and the data position.

        With no step, tries the newest checkpoint first and falls back to older
        ones when a checkpoint cannot be read; the unreadable newer ones are
        then moved aside.
        """
        def read(candidate):
            restored = self._manager.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            return restored.state, dict(restored.data or {})

        candidate, (state, data) = self._restore_newest_readable(read, step)
        return candidate, state, data

    def restore_fields(self, abstract_fields: dict[str, Any], step: int | None = None) -> tuple[int, dict]:
        """Restores only some fields of the saved state, e.g. {'params': ..., 'ema_params': ...}.

        Sampling, evaluation and teachers need neither the optimizer state nor
        the method state; this reads just the arrays asked for (onto the given
        shardings), with the same fallback to older checkpoints as `restore`.
        """
        def read(candidate):
            args = ocp.args.PyTreeRestore(item=abstract_fields, partial_restore=True,
                                          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_fields))
            return dict(self._manager.restore(candidate, args=ocp.args.Composite(state=args)).state)

        return self._restore_newest_readable(read, step)

    def _restore_newest_readable(self, read: Callable[[int], Any], step: int | None) -> tuple[int, Any]:
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self._manager.directory}.")
        errors = []
        for candidate in steps:
            try:
                restored = read(candidate)
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint means: try an older one
                logging.warning("Checkpoint at step %d in %s cannot be restored (%s: %s); "
                                "trying the previous one.", candidate, self._manager.directory,
                                type(e).__name__, e)
                errors.append(f"step {candidate}: {type(e).__name__}: {e}")
                continue
            if errors:
                self._move_aside([s for s in steps if s > candidate])
            return candidate, restored
        raise RuntimeError(f"No checkpoint in {self._manager.directory} could be restored:\n" + "\n".join(errors))

    def _move_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories so that orbax no longer lists them (process 0 renames)."""
        directory = epath.Path(self._manager.directory)
        if jax.process_index() == 0:
            for step in steps:
                target = directory / f"{UNREADABLE_PREFIX}{step}"
                copy = 1
                while target.exists():  # the same step went bad before
                    target, copy = directory / f"{UNREADABLE_PREFIX}{step}_{copy}", copy + 1
                logging.warning("Moving the unreadable checkpoint %s aside to %s.", directory / str(step), target)
                (directory / str(step)).rename(target)
        ocp.multihost.sync_global_processes("consistency_jax_move_unreadable_checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
