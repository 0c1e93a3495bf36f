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
    ("--config.model.name=resnet", "Unknown model name 'resnet'; valid names: adm, edm2, ncsnpp"),
    ("--config.method.name=gan", f"Unknown method name 'gan'; valid names: {', '.join(methods.method_names())}"),
    ("--config.data.name=mnist", "Unknown data.name 'mnist'; valid names: cifar10, imagenet_resized/64x64"),
    ("--config.optimizer.name=sgd", "Unknown config.optimizer.name 'sgd'; valid: adam, radam, adamw"),
    ("--config.parametrization.c_noise=log", "valid: edm, cm, raw"),
    ("--config.training.batch_szie=8", "batch_szie"),
    ("--config.training.num_steps=many", "many"),
])
def test_bad_override_fails_at_start_naming_the_value(tmp_path, override, expected):
    result = run_main(f"--workdir={tmp_path}", override)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not (tmp_path / "checkpoints").exists()  # nothing started


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
