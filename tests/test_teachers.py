"""Loading a teacher: every way it can be wrong stops the run at start, naming the field and what was expected."""

import json
import os
import re
import shutil
import sys

import jax
import pytest

from consistency_jax import experiment, methods, teachers
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cd_config(teacher_workdir, **fields):
    config = tiny_config()
    config.method = methods.method_config("cd")
    config.method.teacher_workdir = None if teacher_workdir is None else str(teacher_workdir)
    config.method.update(fields)
    return config


def start(config):
    """What a run does at start: validate, build the experiment, make the step-0 state (reads the teacher)."""
    experiment.validate_config(config)
    return experiment.create_experiment(config, jax.devices()[:1]).create_state()


def test_cd_without_a_teacher_stops_at_start():
    with pytest.raises(teachers.TeacherError, match=r"needs a teacher: set --config.method.teacher_workdir="):
        start(cd_config(None))


def test_quickstart_cd_without_a_teacher_says_which_flag_and_run_to_give():
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import quickstart_cd
    finally:
        sys.path.pop(0)
    with pytest.raises(teachers.TeacherError, match=r"teacher_workdir=.*configs/quickstart_edm.py"):
        start(quickstart_cd.get_config())


def test_missing_teacher_workdir(tmp_path):
    with pytest.raises(teachers.TeacherError, match=r"config.method.teacher_workdir='.*nowhere' does not exist"):
        start(cd_config(tmp_path / "nowhere"))


def test_a_directory_that_is_not_a_workdir(tmp_path):
    with pytest.raises(teachers.TeacherError, match=r"teacher_workdir='.*' is not a workdir .*no config.json"):
        start(cd_config(tmp_path))


def test_a_workdir_without_checkpoints(edm_teacher_workdir, tmp_path):
    shutil.copy(os.path.join(edm_teacher_workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(teachers.TeacherError, match=r"config.method.teacher_workdir='.*' has no checkpoint"):
        start(cd_config(tmp_path))


def test_a_step_the_teacher_does_not_have(edm_teacher_workdir):
    with pytest.raises(teachers.TeacherError,
                       match=r"config.method.teacher_step=7: the teacher has checkpoints at steps \[2\]"):
        start(cd_config(edm_teacher_workdir, teacher_step=7))


def test_an_ema_the_teacher_does_not_keep(edm_teacher_workdir):
    with pytest.raises(teachers.TeacherError,
                       match=r"config.method.teacher_ema_rate=0.5: the teacher keeps the EMAs \(0.9,\)"):
        start(cd_config(edm_teacher_workdir, teacher_ema_rate=0.5))


def test_a_student_network_of_another_shape(edm_teacher_workdir):
    config = cd_config(edm_teacher_workdir)
    config.model.model_channels = 16
    with pytest.raises(teachers.TeacherError) as error:
        start(config)
    message = str(error.value)
    assert "config.model" in message and "config.method.init_from_teacher" in message
    # Each differing array with both shapes (the first few in name order: with 16 instead of 8 channels).
    assert re.search(r"arrays differ, e\.g\. \S+: student \([\d, ]+\) vs teacher \([\d, ]+\)", message), message


def test_a_teacher_checkpoint_that_does_not_match_its_own_config(edm_teacher_workdir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(edm_teacher_workdir, teacher)
    saved = json.loads((teacher / "config.json").read_text())
    saved["model"]["model_channels"] = 16  # the config.json now describes another network than the checkpoint
    (teacher / "config.json").write_text(json.dumps(saved))
    config = cd_config(teacher, init_from_teacher=False)
    config.model.model_channels = 16
    with pytest.raises(teachers.TeacherError) as error:
        start(config)
    message = str(error.value)
    assert "config.method.teacher_workdir" in message and "step 2" in message
    assert re.search(r"arrays differ .*e\.g\. \S+: expected \([\d, ]+\), stored \([\d, ]+\)", message), message


def test_an_unreadable_teacher_checkpoint(edm_teacher_workdir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(edm_teacher_workdir, teacher)
    for root, _, files in os.walk(teacher / "checkpoints" / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(teachers.TeacherError, match=r"config.method.teacher_workdir=.*step 2.*cannot be read"):
        start(cd_config(teacher))


def test_the_teacher_workdir_is_left_untouched(edm_teacher_workdir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(edm_teacher_workdir, teacher)
    before = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(teacher) for f in fs)
    state = start(cd_config(teacher))
    after = sorted((p, os.path.getmtime(os.path.join(p, f))) for p, _, fs in os.walk(teacher) for f in fs)
    assert before == after
    assert state.method_state.keys() == {"teacher"}
