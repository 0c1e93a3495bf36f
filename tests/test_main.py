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
