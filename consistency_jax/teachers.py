"""Teachers and initialisations: the params of another run of this framework, frozen.

A method that uses a teacher (CD distils one; ECT/SCT start from one) names it
with `config.method.teacher_workdir`: a workdir of this framework, i.e. a
trained diffusion run (configs/*_edm.py) or an EDM checkpoint converted with
`python -m consistency_jax.convert`. Its `config.json` says which network and
parametrization it has; its checkpoint gives the params (`teacher_step`,
`teacher_ema_rate`). Only the params are read, never the teacher's optimizer
or method state, and the teacher's directory is opened read-only.

The teacher's config is copied into the student's workdir at the first start
(`teacher_config.json`), so that a resumed run, sampling and evaluation build
the same network even if the teacher's workdir has moved since.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from consistency_jax import checkpointing, methods, parallel
from consistency_jax.models import create_model
from consistency_jax.parametrization import NetworkFunction

SNAPSHOT_NAME = "teacher_config.json"


class TeacherError(ValueError):
    """The teacher named by config.method.teacher_workdir cannot be used; the message says why."""


def wants_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether this run loads a teacher (its method uses one and a teacher_workdir is given)."""
    use = methods.get_method(config.method.name).teacher
    if use == "none":
        return False
    if use == "required" and not config.method.get("teacher_workdir"):
        raise TeacherError(
            f"Method {config.method.name!r} needs a teacher: set --config.method.teacher_workdir=<workdir of a "
            f"trained diffusion run of this framework (e.g. configs/quickstart_edm.py), or of an EDM checkpoint "
            f"converted with python -m consistency_jax.convert>.")
    return bool(config.method.get("teacher_workdir"))


def teacher_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> ml_collections.ConfigDict:
    """The teacher run's config: the student workdir's snapshot if there is one, else the teacher's own."""
    snapshot = os.path.join(workdir, SNAPSHOT_NAME) if workdir else None
    if snapshot and epath.Path(snapshot).exists():
        return _read_config(snapshot)
    teacher_dir = config.method.teacher_workdir
    path = os.path.join(teacher_dir, "config.json")
    if not epath.Path(teacher_dir).exists():
        raise TeacherError(f"config.method.teacher_workdir={teacher_dir!r} does not exist. Give the workdir of a "
                           f"trained diffusion run of this framework (e.g. configs/quickstart_edm.py).")
    if not epath.Path(path).exists():
        raise TeacherError(
            f"config.method.teacher_workdir={teacher_dir!r} is not a workdir of this framework: it has no "
            f"config.json. Give the workdir of a trained run, or convert an EDM checkpoint first "
            f"(python -m consistency_jax.convert).")
    return _read_config(path)


def save_snapshot(teacher: ml_collections.ConfigDict, workdir: str) -> None:
    path = epath.Path(workdir) / SNAPSHOT_NAME
    if jax.process_index() == 0 and not path.exists():
        path.write_text(teacher.to_json_best_effort(indent=2))


def _read_config(path: str) -> ml_collections.ConfigDict:
    try:
        return ml_collections.ConfigDict(json.loads(epath.Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise TeacherError(f"The teacher's config {path} cannot be read: {type(e).__name__}: {e}") from e


def teacher_function(teacher: ml_collections.ConfigDict) -> NetworkFunction:
    """The teacher's network in the parametrization of the method that trained it."""
    model = create_model(teacher.model)
    return methods.get_method(teacher.method.name).make_function(teacher, model)


def check_compatible(teacher: ml_collections.ConfigDict, image_shape: tuple[int, int, int],
                     num_classes: int) -> None:
    data = teacher.data
    teacher_shape = (data.image_size, data.image_size, data.num_channels)
    if teacher_shape != tuple(image_shape) or data.num_classes != num_classes:
        raise TeacherError(
            f"The teacher was trained on {teacher_shape[0]}x{teacher_shape[1]}x{teacher_shape[2]} images with "
            f"{data.num_classes} classes; this run's data are {image_shape[0]}x{image_shape[1]}x{image_shape[2]} "
            f"with {num_classes} classes.")


def param_shapes(fn: NetworkFunction, image_shape: tuple[int, int, int], num_classes: int) -> Any:
    return jax.eval_shape(lambda rng: fn.init(rng, image_shape, num_classes > 0), jax.random.PRNGKey(0))


def load_params(config: ml_collections.ConfigDict, teacher: ml_collections.ConfigDict, shapes: Any,
                mesh: jax.sharding.Mesh) -> Any:
    """The teacher's params (the EMA `teacher_ema_rate` picks), sharded over `mesh` like params."""
    fields = config.method
    directory = os.path.join(fields.teacher_workdir, "checkpoints")
    checkpointer = checkpointing.Checkpointer(directory, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise TeacherError(f"config.method.teacher_workdir={fields.teacher_workdir!r} has no checkpoint in "
                               f"{directory}.")
        step = max(steps) if fields.teacher_step < 0 else fields.teacher_step
        if step not in steps:
            raise TeacherError(f"config.method.teacher_step={step}: the teacher has checkpoints at steps {steps}.")
        field, index = _params_field(fields.teacher_ema_rate, tuple(teacher.training.ema_rates))
        shardings = parallel.state_shardings(shapes, mesh, config.mesh.fsdp_min_size)
        target = checkpointing.abstract_with_shardings(shapes, shardings)
        # The teacher's ema_params also hold its power-function EMAs (training.ema_sigma_rels), if any.
        num_emas = len(teacher.training.ema_rates) + len(teacher.training.get("ema_sigma_rels", ()))
        wanted = {field: target} if index is None else {field: tuple(target for _ in range(num_emas))}
        try:
            _, restored = checkpointer.restore_fields(wanted, step)
        except Exception as e:  # noqa: BLE001 -- reported with the shapes the teacher's config.json expects
            differences = _shape_differences(directory, step, field, index, shapes)
            reason = (f"{len(differences)} arrays differ from the network its config.json describes, e.g. "
                      + "; ".join(differences[:5]) if differences else f"{type(e).__name__}: {e}")
            raise TeacherError(
                f"config.method.teacher_workdir={fields.teacher_workdir!r}: its params at step {step} "
                f"({field}) cannot be read as the network of its config.json ({teacher.model.name}, "
                f"{sum(x.size for x in jax.tree.leaves(shapes)):,} params): {reason}") from e
    finally:
        checkpointer.close()
    return restored[field] if index is None else restored[field][index]


def _shape_differences(directory: str, step: int, field: str, index: int | None, expected: Any) -> list[str]:
    """'name: expected (..), stored (..)' for each array whose stored shape differs; [] if unknown."""
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(epath.Path(directory) / str(step) / "state")
        stored = metadata.item_metadata.tree[field]
        stored = stored if index is None else stored[index]
    except Exception:  # noqa: BLE001 -- no metadata to compare with: the caller reports the read error
        return []
    stored_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)
                     if hasattr(v, "shape")}
    expected_shapes = {jax.tree_util.keystr(k): tuple(v.shape)
                       for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    return [f"{field}{name}: expected {expected_shapes.get(name, 'absent')}, stored {stored_shapes.get(name, 'absent')}"
            for name in sorted({*stored_shapes, *expected_shapes})
            if expected_shapes.get(name) != stored_shapes.get(name)]


def _params_field(ema_rate: float, ema_rates: tuple[float, ...]) -> tuple[str, int | None]:
    """('params', None) for the raw params, ('ema_params', i) for the i-th EMA."""
    if ema_rate == 0 or (ema_rate < 0 and not ema_rates):
        return "params", None
    if ema_rate < 0:
        return "ema_params", 0
    if ema_rate not in ema_rates:
        raise TeacherError(f"config.method.teacher_ema_rate={ema_rate}: the teacher keeps the EMAs {ema_rates} "
                           f"(0 selects its raw params, -1 its first EMA).")
    return "ema_params", ema_rates.index(ema_rate)


def require_same_shapes(params: Any, teacher_params: Any) -> None:
    """Stops with the differing arrays when the student cannot start from the teacher's params."""
    student = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    teacher = {jax.tree_util.keystr(k): tuple(v.shape)
               for k, v in jax.tree_util.tree_leaves_with_path(teacher_params)}
    if student == teacher:
        return
    differences = [f"{name}: student {student.get(name, 'absent')} vs teacher {teacher.get(name, 'absent')}"
                   for name in sorted({*student, *teacher}) if student.get(name) != teacher.get(name)]
    raise TeacherError(
        f"This run's network (config.model) differs from the teacher's, so it cannot start from the teacher's "
        f"params; set config.model to the teacher's network (see teacher_config.json / the teacher's "
        f"config.json). {len(differences)} arrays differ, e.g. " + "; ".join(differences[:5]))
