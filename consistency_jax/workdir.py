"""The run's workdir: whether it is usable, and the configs a run was trained with.

`config.json` is the config of the newest training start; every start that
trains with a config different from the previous one also leaves a copy in
`config_history/step_<start step>.json`, so the settings of every stretch of a
run stay on record. A resumed run is compared with `config.json` before any
checkpoint is read: differences are listed (and are fatal when they change
the arrays of the train state, see train.py).
"""

import json
import os
import uuid
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from consistency_jax.errors import UserError

CONFIG_NAME = "config.json"
HISTORY_DIR = "config_history"
_MAX_LISTED = 12


class WorkdirError(UserError, OSError):
    """The workdir cannot be used (it is a file, or cannot be created or written)."""


def check_usable(workdir: str, *, must_exist: bool = False) -> None:
    """Raises WorkdirError in one line when `workdir` is a file, cannot be created or cannot be written.

    Remote paths (gs://, ...) are left to the storage layer.
    """
    if "://" in workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory.")
    if not os.path.exists(workdir):
        if must_exist:
            raise WorkdirError(f"--workdir={workdir} does not exist: train first (--mode=train), or check the path.")
        try:
            os.makedirs(workdir)
        except OSError as e:
            raise WorkdirError(f"--workdir={workdir} cannot be created: {e.strerror or e}.") from e
    probe = os.path.join(workdir, f".write_test_{uuid.uuid4().hex}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} is not writable: {e.strerror or e}.") from e


def config_as_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists), as config.json stores it."""
    return json.loads(config.to_json_best_effort())


def saved_config(workdir: str) -> dict | None:
    """The run's config.json as a dict, or None if there is none (or it cannot be parsed: logged)."""
    path = epath.Path(workdir) / CONFIG_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logging.warning("%s cannot be read (%s: %s); the config cannot be compared with the run's.", path,
                        type(e).__name__, e)
        return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every field that differs; absent fields show as '<absent>'."""
    a, b = _flatten(old), _flatten(new)
    absent = "<absent>"
    return [(key, a.get(key, absent), b.get(key, absent)) for key in sorted({*a, *b}) if a.get(key, absent) != b.get(key, absent)]


def format_differences(changes: list[tuple[str, Any, Any]]) -> str:
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes[:_MAX_LISTED])
    return listed + (f"; and {len(changes) - _MAX_LISTED} more" if len(changes) > _MAX_LISTED else "")


def describe_differences(workdir: str, config: ml_collections.ConfigDict) -> str:
    """A sentence naming the fields in which `config` differs from the run's config.json (for error messages)."""
    saved = saved_config(workdir)
    if saved is None:
        return f"({workdir}/{CONFIG_NAME} is missing, so the differing fields cannot be named.)"
    changes = differences(saved, config_as_dict(config))
    if not changes:
        return f"The config equals {workdir}/{CONFIG_NAME}."
    return (f"Fields that differ from {workdir}/{CONFIG_NAME}: {format_differences(changes)}. Use the config the run "
            f"was trained with, or a new workdir.")


def record_config(workdir: str, config: ml_collections.ConfigDict, start_step: int) -> None:
    """Writes config.json and, if the config changed (or is the first), a copy in config_history/."""
    values = config_as_dict(config)
    text = json.dumps(values, indent=2)
    saved = saved_config(workdir)
    directory = epath.Path(workdir)
    if saved is None or differences(saved, values):
        history = directory / HISTORY_DIR
        history.mkdir(parents=True, exist_ok=True)
        if saved is not None and not any(history.iterdir()):
            # A run from before config histories: keep the config it was trained with so far.
            (history / "step_unknown.json").write_text(json.dumps(saved, indent=2))
        name, copy = f"step_{start_step:08d}", 1
        while (history / f"{name}.json").exists():
            name, copy = f"step_{start_step:08d}_{copy}", copy + 1
        (history / f"{name}.json").write_text(text)
    partial = directory / f"{CONFIG_NAME}.partial"
    partial.write_text(text)
    partial.replace(directory / CONFIG_NAME)
