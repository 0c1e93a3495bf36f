"""The command line: bad config values fail at start with a message naming them and the valid ones."""

import os
import subprocess
import sys

import pytest

from consistency_jax import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "consistency_jax.main", "--config=configs/quickstart.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,expected", [
    ("--config.model.name=resnet", "config.model.name='resnet' is invalid: must be one of 'adm', 'edm2', 'ncsnpp'"),
    ("--config.method.name=gan", f"Unknown method name 'gan'; valid names: {', '.join(methods.method_names())}"),
    ("--config.data.name=mnist", "config.data.name='mnist' is invalid: must be one of 'cifar10', 'imagenet_resized/64x64'"),
    ("--config.optimizer.name=sgd", "config.optimizer.name='sgd' is invalid: must be one of 'adam', 'radam', 'adamw'"),
    ("--config.parametrization.c_noise=log", "must be one of 'edm', 'cm', 'raw'"),
    ("--config.training.batch_szie=8", "config.training has no field 'batch_szie'. Did you mean "
                                       "config.training.batch_size? Valid fields of config.training: batch_size,"),
    ("--config.training.num_steps=many", "many"),
])
def test_bad_override_fails_at_start_naming_the_value(tmp_path, override, expected):
    result = run_main(f"--workdir={tmp_path}", override)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert_one_message(result)
    assert not (tmp_path / "checkpoints").exists()  # nothing started


def assert_one_message(result):
    """The error alone: no traceback, no config dump, no flag help before it."""
    output = (result.stderr + result.stdout).strip()
    assert "Traceback" not in output and "Config:" not in output and "--helpfull" not in output
    assert len(output.splitlines()) <= 2, output


@pytest.mark.parametrize("args,expected", [
    (["--workdir={file}"], "--workdir={file} is a file, not a directory."),
    (["--workdir={dir}", "--step=3"], "--step=3 selects a checkpoint for --mode=sample, eval and edit"),
    (["--workdir={dir}", "--mode=sample"], "does not exist: train first"),
])
def test_bad_workdir_and_flags_fail_in_one_line(tmp_path, args, expected):
    file, directory = tmp_path / "a_file", tmp_path / "run"
    file.write_text("")
    fill = lambda text: text.format(file=file, dir=directory)  # noqa: E731
    result = run_main(*map(fill, args))
    assert result.returncode != 0 and fill(expected) in result.stderr
    assert_one_message(result)


@pytest.mark.parametrize("cpu_devices,expected", [
    (3, "must divide by the number of devices in the mesh (3)"),  # the host split into 3 CPU devices
    (0, "must divide by the number of devices in the mesh (8)"),  # XLA's own setting: the tests' XLA_FLAGS
    (-2, "config.mesh.cpu_devices=-2 is invalid"),
])
def test_cpu_devices_split_the_host_before_the_mesh_is_built(tmp_path, cpu_devices, expected):
    """The batch-size check at start counts the devices that config.mesh.cpu_devices made (batch 4: no mesh fits)."""
    result = run_main(f"--workdir={tmp_path}", f"--config.mesh.cpu_devices={cpu_devices}",
                      "--config.training.batch_size=4")
    assert result.returncode != 0 and expected in result.stderr + result.stdout, result.stderr[-2000:]
    assert_one_message(result)


def test_loading_every_config_and_the_package_leaves_the_backend_alone():
    """A multi-host job calls jax.distributed.initialize() after the config is loaded; any module-level jax array in
    a config's imports (methods, models, augmentations) starts the XLA backend first and makes it fail."""
    script = (
        "import glob, importlib.util, sys\n"
        "for path in sorted(glob.glob('configs/*.py')):\n"
        "    spec = importlib.util.spec_from_file_location('config_under_test', path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.get_config()\n"
        "import consistency_jax.experiment, consistency_jax.train, consistency_jax.evaluation.generate\n"
        "from jax._src import xla_bridge\n"
        "print('backend started:', xla_bridge.backends_are_initialized())\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.join(REPO, "configs")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend started: False" in result.stdout, result.stdout
