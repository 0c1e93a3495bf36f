"""Orbax checkpoints of the train state plus the data iterator's position, with integrity data.

What a checkpoint promises:
- Atomic: orbax writes to a temporary directory and renames it when complete,
  so a run killed mid-save leaves the previous checkpoints intact; the next run
  removes the unfinished temporary directory.
- Verified: beside the arrays every checkpoint holds an `integrity` item, a
  64-bit digest of every array's bits (computed on the devices, independent of
  the mesh) and of the data position. A restore recomputes the digests of what
  it read and checks every floating-point array for NaN/inf. A checkpoint that
  fails (unreadable files, changed bytes, non-finite values) is treated as
  damaged: restore falls back to the next older one with a warning and, when
  the directory is this run's own, moves the damaged ones aside (to
  `unreadable_<step>`) so that the resumed run can save those steps again.
- Never non-finite: `save` refuses a state with NaN/inf anywhere (params,
  EMAs, optimizer and method state), so a bad state cannot push good
  checkpoints out.
- Failed saves stop the run: a background save that fails (disk full,
  permissions) is reported by `check_for_errors` (the loop calls it every step)
  with the step and the error. Old checkpoints are deleted only after a newer
  one is complete, and the newest is never deleted (keep >= 1).
- Compatible or refused: before reading arrays, restore compares the saved
  shapes (orbax metadata) with the ones expected and raises
  IncompatibleCheckpointError listing the differences, instead of orbax's
  errors from deep inside the restore.

orbax 0.12 keeps no checksum of array data (OCDBT/zarr store the bytes as
written; only zarr3's shard index carries a crc32c), hence the digests here.
"""

import functools
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from consistency_jax.errors import UserError

UNREADABLE_PREFIX = "unreadable_"
INTEGRITY_FORMAT = 1
_MAX_LISTED = 5


class CheckpointError(UserError, RuntimeError):
    """Checkpoints cannot be used or written; the message names the directory and the steps."""


class IncompatibleCheckpointError(CheckpointError):
    """The saved arrays have other shapes or names than the state they should be restored into."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, ...)."""


class NonFiniteStateError(CheckpointError, FloatingPointError):
    """The state to save holds NaN or inf; it is not saved."""


class DamagedCheckpointError(Exception):
    """A checkpoint's arrays do not match its integrity data or are not finite."""


# ----------------------------------------------------------------------------
# Integrity data: digests and finiteness of every array, computed on device.
# ----------------------------------------------------------------------------


def path_name(path: tuple) -> str:
    """'params/enc_conv_in/kernel', 'ema_params/0/...': the same for a TrainState and orbax's saved dicts."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection that mixes every input bit into every output bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_summary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(two uint32 sums of hashed (bits, index) pairs, whether every value is finite).

    Each element contributes fmix(bits * c + index * c' + seed); since fmix and
    the affine map are bijections, changing any single value always changes
    both sums, and more changes collide with probability ~2^-64. Wrapping
    integer sums do not depend on the order of reduction, so the digest is the
    same on any mesh.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) if bits.ndim else jnp.uint32(0)
    for dim in range(1, bits.ndim):
        index = index * jnp.uint32(bits.shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim)
    sums = [jnp.sum(_fmix32(bits * jnp.uint32(a) + index * jnp.uint32(b) + jnp.uint32(c)), dtype=jnp.uint32)
            for a, b, c in ((0x9E3779B1, 0x85EBCA77, 0x165667B1), (0xC2B2AE3D, 0x27D4EB2F, 0x61C88647))]
    return jnp.stack(sums), finite


@functools.lru_cache(maxsize=8)
def _jitted_summary(mesh: jax.sharding.Mesh | None) -> Callable:
    """The jitted `_leaf_summary`, with replicated results on a mesh so that every process can read them.

    One small function per (shape, dtype, sharding), compiled once per
    process: far cheaper to compile than one function over the whole state.
    """
    if mesh is None:
        return jax.jit(_leaf_summary)
    return jax.jit(_leaf_summary, out_shardings=NamedSharding(mesh, PartitionSpec()))


def array_summaries(tree: Any) -> dict[str, tuple[str, bool]]:
    """{path: (digest hex, all finite)} for every array of `tree` (global arrays, any sharding)."""
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    # The summary of a split array (FSDP, or any array with several processes) is a collective across devices.
    # XLA CPU runs the programs dispatched to its devices on a thread pool, not in dispatch order per device: two
    # devices waiting in different programs' all-reduces deadlock until XLA aborts the process (seen with 8 fake
    # devices and fsdp=2; with two processes too). Those summaries run one at a time; the others stay in flight.
    several_processes = jax.process_count() > 1
    results = []
    for _, leaf in with_paths:
        sharding = getattr(leaf, "sharding", None)
        result = _jitted_summary(sharding.mesh if isinstance(sharding, NamedSharding) else None)(leaf)
        collective = several_processes or (sharding is not None and not sharding.is_fully_replicated)
        results.append(jax.block_until_ready(result) if collective else result)
    results = jax.device_get(results)
    return {path_name(path): (f"{int(sums[0]):08x}{int(sums[1]):08x}", bool(finite))
            for (path, _), (sums, finite) in zip(with_paths, results)}


def data_digest(data_state: dict) -> str:
    return hashlib.sha256(json.dumps(data_state, sort_keys=True).encode()).hexdigest()[:16]


def nonfinite_arrays(summaries: dict[str, tuple[str, bool]]) -> list[str]:
    return [path for path, (_, finite) in summaries.items() if not finite]


def _listed(paths: list[str]) -> str:
    more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
    return ", ".join(paths[:_MAX_LISTED]) + more


def verify(tree: Any, integrity: dict | None, data_state: dict | None = None) -> None:
    """Raises DamagedCheckpointError if an array of `tree` is not finite or differs from its saved digest."""
    summaries = array_summaries(tree)
    nonfinite = nonfinite_arrays(summaries)
    if nonfinite:
        raise DamagedCheckpointError(f"non-finite values (NaN/inf) in {len(nonfinite)} arrays: {_listed(nonfinite)}")
    if integrity is None:  # written before checkpoints carried integrity data
        return
    saved = integrity.get("arrays", {})
    differ = sorted(path for path, (digest, _) in summaries.items() if saved.get(path) != digest)
    if differ:
        raise DamagedCheckpointError(f"{len(differ)} arrays differ from the digests written with the checkpoint: "
                                     f"{_listed(differ)}")
    if data_state is not None and "data" in integrity and integrity["data"] != data_digest(data_state):
        raise DamagedCheckpointError("the data position differs from the digest written with the checkpoint")


def shape_differences(saved: Any, target: Any) -> list[str]:
    """Arrays whose names or shapes differ between saved metadata and a target tree (empty if compatible)."""
    def shapes(tree):
        return {path_name(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    old, new = shapes(saved), shapes(target)
    return [f"{name}: saved {old.get(name, 'absent')}, expected {new.get(name, 'absent')}"
            for name in sorted({*old, *new}) if old.get(name) != new.get(name)]


# ----------------------------------------------------------------------------
# The checkpointer.
# ----------------------------------------------------------------------------


class Checkpointer:
    """One CheckpointManager with the items 'state' (sharded arrays), 'data' and 'integrity' (JSON)."""

    def __init__(self, directory: str, *, keep: int = 1, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False, best_metric: str | None = None):
        """`read_only` opens another run's checkpoints (a teacher's, or for sampling) without changing them.

        `keep` (>= 1) newest checkpoints are kept, plus every one at a multiple
        of `keep_every`; with `best_metric`, the `keep` with the lowest value of
        that metric (passed to `save`) instead.
        """
        if keep < 1:
            raise ValueError(f"A Checkpointer keeps at least the newest checkpoint (keep >= 1), got keep={keep}.")
        if read_only and not epath.Path(directory).is_dir():
            raise CheckpointError(f"No checkpoint directory {directory}.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            keep_period=keep_every or None,
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save that a kill interrupted
        )
        self._directory = directory
        self._read_only = read_only
        self._pending: int | None = None  # step of a save that may still be running in the background
        self._failed = False
        self._manager = ocp.CheckpointManager(directory, options=options,
                                              item_names=("state", "data", "integrity"))

    @property
    def directory(self) -> str:
        return self._directory

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def metrics(self, step: int) -> dict | None:
        return self._manager.metrics(step)

    # -- Saving ---------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False,
             metrics: dict | None = None) -> bool:
        """Starts writing `state` at `step` (in the background when async); False if the policy skips it.

        Waits for the previous save (orbax would too) and raises CheckpointSaveError
        if it or this one fails, and NonFiniteStateError (writing nothing) if any
        array of `state` is not finite.
        """
        if self._pending is not None:
            self._finish_pending()
        if not force and not self._manager.should_save(step):
            return False
        data_state = dict(data_state or {})
        summaries = array_summaries(state)
        nonfinite = nonfinite_arrays(summaries)
        if nonfinite:
            raise NonFiniteStateError(
                f"Not saving the checkpoint of step {step}: the train state holds NaN/inf in {len(nonfinite)} "
                f"arrays ({_listed(nonfinite)}). The checkpoints in {self._directory} (newest: step "
                f"{self.latest_step()}) are left as they are.")
        integrity = {"format": INTEGRITY_FORMAT, "data": data_digest(data_state),
                     "arrays": {path: digest for path, (digest, _) in summaries.items()}}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                                  integrity=ocp.args.JsonSave(integrity))
        try:
            saved = self._manager.save(step, args=args, force=force, metrics=metrics)
        except Exception as error:  # noqa: BLE001 -- the synchronous part of the save failed
            self._raise_save_error(step, error)
        if saved:
            self._pending = step
        return saved

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if the last background save failed; returns at once while it runs."""
        if self._pending is None or self._manager.is_saving_in_progress():
            return
        self._finish_pending()

    def wait(self) -> None:
        """Blocks until the last save is complete; raises CheckpointSaveError if it failed."""
        self._finish_pending()

    def _finish_pending(self) -> None:
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001 -- whatever the storage raised, the run must stop
            self._raise_save_error(step, error)

    def _raise_save_error(self, step: int | None, error: Exception) -> None:
        self._failed = True
        self._manager.reload()
        latest = self._manager.latest_step()
        raise CheckpointSaveError(
            f"Saving the checkpoint of step {step} to {self._directory} failed: {type(error).__name__}: "
            f"{error}. The run stops here. The complete checkpoints before it are untouched (newest: "
            f"{'none' if latest is None else f'step {latest}'}); fix the cause (e.g. free disk space) and run "
            f"the same command again to resume.") from error

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any of them got a preemption notice (multi-host TPU/GPU)."""
        return self._manager.reached_preemption(step)

    # -- Restoring ------------------------------------------------------------

    def saved_shapes(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes), read without reading the arrays."""
        metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(self._directory) / str(step) / "state")
        return getattr(metadata, "tree", metadata)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores the whole state onto the shardings of `abstract_state` (any mesh shape), and the data position.

        With no step, tries the newest checkpoint first and falls back to older
        ones when a checkpoint is damaged; the damaged newer ones are then moved
        aside. Raises IncompatibleCheckpointError when the saved arrays do not
        fit `abstract_state` (another network or optimizer).
        """
        def read(candidate):
            self._check_shapes(candidate, self.saved_shapes(candidate), abstract_state)
            present = self._items_on_disk(candidate)
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            args.update({name: ocp.args.JsonRestore() for name in ("data", "integrity") if name in present})
            restored = self._manager.restore(candidate, args=ocp.args.Composite(**args))
            data = dict(restored.data or {}) if "data" in present else {}
            verify(restored.state, restored.integrity if "integrity" in present else None,
                   data if "data" in present else None)
            return restored.state, data

        candidate, (state, data) = self._restore_newest_intact(read, step)
        return candidate, state, data

    def restore_fields(self, abstract_fields: dict[str, Any], step: int | None = None) -> tuple[int, dict]:
        """Restores only some fields of the saved state, e.g. {'params': ..., 'ema_params': ...}.

        Sampling, evaluation and teachers need neither the optimizer state nor
        the method state; this reads just the arrays asked for (onto the given
        shardings), verifies them like `restore`, with the same fallback.
        """
        def read(candidate):
            saved = self.saved_shapes(candidate)
            saved_fields = {name: saved.get(name) for name in abstract_fields}
            self._check_shapes(candidate, saved_fields, abstract_fields)
            present = self._items_on_disk(candidate)
            args = {"state": ocp.args.PyTreeRestore(
                item=abstract_fields, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_fields))}
            if "integrity" in present:
                args["integrity"] = ocp.args.JsonRestore()
            restored = self._manager.restore(candidate, args=ocp.args.Composite(**args))
            fields = dict(restored.state)
            verify(fields, restored.integrity if "integrity" in present else None)
            return fields

        return self._restore_newest_intact(read, step)

    def _items_on_disk(self, step: int) -> set[str]:
        directory = epath.Path(self._directory) / str(step)
        return {name for name in ("state", "data", "integrity") if (directory / name).exists()}

    def _check_shapes(self, step: int, saved: Any, target: Any) -> None:
        differences = shape_differences(saved, target)
        if differences:
            raise IncompatibleCheckpointError(
                f"The checkpoint at step {step} in {self._directory} holds other arrays than this run's network, "
                f"optimizer and method expect ({len(differences)} differ: {_listed(differences)}).")

    def _restore_newest_intact(self, read: Callable[[int], Any], step: int | None) -> tuple[int, Any]:
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"No checkpoint in {self._directory}.")
        errors = []
        for candidate in steps:
            try:
                restored = read(candidate)
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- any unreadable or damaged checkpoint: try an older one
                reason = f"{type(e).__name__}: {e}" if not isinstance(e, DamagedCheckpointError) else str(e)
                logging.warning("Checkpoint at step %d in %s is damaged (%s)%s", candidate, self._directory,
                                reason, "; trying the previous one." if candidate != steps[-1] else ".")
                errors.append(f"step {candidate}: {reason}")
                continue
            if errors:
                logging.warning("Using the checkpoint at step %d in %s.", candidate, self._directory)
                if not self._read_only:
                    self._move_aside([s for s in steps if s > candidate])
            return candidate, restored
        raise CheckpointError(f"No checkpoint in {self._directory} is intact:\n" + "\n".join(errors))

    def _move_aside(self, steps: list[int]) -> None:
        """Renames damaged step directories so that orbax no longer lists them (process 0 renames)."""
        directory = epath.Path(self._directory)
        if jax.process_index() == 0:
            for step in steps:
                target = directory / f"{UNREADABLE_PREFIX}{step}"
                copy = 1
                while target.exists():  # the same step went bad before
                    target, copy = directory / f"{UNREADABLE_PREFIX}{step}_{copy}", copy + 1
                logging.warning("Moving the damaged checkpoint %s aside to %s.", directory / str(step), target)
                (directory / str(step)).rename(target)
        ocp.multihost.sync_global_processes("consistency_jax_move_unreadable_checkpoints")
        self._manager.reload()

    def close(self) -> None:
        """Waits for the last save; raises CheckpointSaveError if it failed (unless that was already raised)."""
        try:
            if self._pending is not None:
                self._finish_pending()
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001 -- orbax re-raises a failed save that was already reported
                if not self._failed:
                    raise


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
