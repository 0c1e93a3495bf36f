"""benchmarks/train_step.py: the reported figures are present and consistent with each other."""

import copy
import importlib.util
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bf16_consistency
from benchmarks import train_step as bench
from consistency_jax.models import create_model
from tests.helpers import tiny_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
BATCH = 8  # a multiple of the 8 fake devices of conftest
STEPS = 2
SAMPLE_BATCH = 8


def load_config(name: str):
    """Loads a config file by path, as ml_collections' config_flags does."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_param_count(config) -> int:
    """Counted from the network's own init, independently of the train state the benchmark builds."""
    model = create_model(config.model)
    size, channels = config.data.image_size, config.data.num_channels
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, size, size, channels)),
                                               jnp.zeros((1,)), None, train=False)["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def quickstart_result():
    config = load_config("quickstart")
    original = copy.deepcopy(config)
    result = bench.run_benchmark(config, batch_size=BATCH, steps=STEPS, sample_batch=SAMPLE_BATCH, sample_repeats=2)
    assert config.to_dict() == original.to_dict(), "the benchmark must not modify the caller's config"
    return config, result


def test_param_count_is_the_models(quickstart_result):
    config, result = quickstart_result
    assert result["param_count"] == model_param_count(config)
    # The quickstart's Fourier frequencies (model_channels of them) are frozen: counted, but not trained.
    assert result["trained_param_count"] == result["param_count"] - config.model.model_channels


def test_throughput_follows_from_the_median_step_time(quickstart_result):
    _, result = quickstart_result
    times = result["step_seconds"]
    assert len(times) == STEPS and all(t > 0 for t in times)
    assert result["step_s_median"] == pytest.approx(statistics.median(times))
    assert result["steps_per_s"] == pytest.approx(1 / result["step_s_median"])
    assert result["train_images_per_s"] == pytest.approx(BATCH * result["steps_per_s"])
    assert result["batch_size"] == BATCH and result["steps"] == STEPS


def test_sampling_throughput_follows_from_the_median_call_time(quickstart_result):
    _, result = quickstart_result
    assert len(result["sample_seconds"]) == 2
    assert result["sample_images_per_s"] == pytest.approx(SAMPLE_BATCH / statistics.median(result["sample_seconds"]))
    assert result["sample_compile_s"] > 0


def test_compile_time_memory_and_machine_are_reported(quickstart_result):
    config, result = quickstart_result
    assert result["compile_s"] > 0
    assert result["platform"] == "cpu" and result["num_devices"] == jax.device_count()
    assert result["cpu_cores"] >= 1 and len(result["load_avg_1m"]) == 2
    assert result["memory_measure"] == "process peak RSS"
    # The peak includes at least the live train state: params, EMA, two Adam moments (float32).
    assert result["peak_memory_bytes"] >= result["peak_memory_train_bytes"] > 4 * 4 * result["param_count"]
    assert result["image_shape"] == [config.data.image_size] * 2 + [config.data.num_channels]
    assert result["xla_optimizations"] is False  # conftest turns them off, and the report must say so
    assert "WARNING" in bench.format_table(result)
    assert result["vs_peer"] is None  # no peer figure for the digits network


def test_table_shows_the_figures(quickstart_result):
    _, result = quickstart_result
    table = bench.format_table(result)
    assert f"{result['param_count']:,} params" in table
    assert f"{result['train_images_per_s']:.2f}" in table
    assert f"{result['sample_images_per_s']:.2f} images/s at batch {SAMPLE_BATCH}" in table


def test_peer_ratios_use_the_benchmarks_md_figures():
    ncsnpp = 56_395_523
    cmp = bench.peer_comparison(ncsnpp, (32, 32, 3), "float32", "cpu", batch_size=8, step_seconds=7.0,
                                sample_batch=64, sample_images_per_s=4.32)
    assert cmp["network"] == "NCSN++ CIFAR-10"
    assert cmp["train_speedup"] == pytest.approx(14.0 / 7.0)
    assert cmp["sample_speedup"] == pytest.approx(4.32 / 2.16)
    small = bench.peer_comparison(1_777_635, (32, 32, 3), "float32", "cpu", 32, 1.0, 64, 61.7)
    assert small["train_speedup"] == pytest.approx(1.99) and small["sample_speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("change", [dict(batch_size=16), dict(sample_batch=32)])
def test_peer_ratio_needs_the_peers_batch(change):
    args = dict(param_count=56_395_523, image_shape=(32, 32, 3), dtype="float32", platform="cpu", batch_size=8,
                step_seconds=7.0, sample_batch=64, sample_images_per_s=4.0)
    cmp = bench.peer_comparison(**{**args, **change})
    assert ("train_speedup" in cmp) == ("batch_size" not in change)
    assert ("sample_speedup" in cmp) == ("sample_batch" not in change)


@pytest.mark.parametrize("change", [dict(dtype="bfloat16"), dict(platform="gpu"), dict(image_shape=(64, 64, 3)),
                                    dict(param_count=123)])
def test_no_peer_ratio_for_a_different_network_or_machine(change):
    args = dict(param_count=56_395_523, image_shape=(32, 32, 3), dtype="float32", platform="cpu", batch_size=8,
                step_seconds=7.0, sample_batch=64, sample_images_per_s=4.0)
    assert bench.peer_comparison(**{**args, **change}) is None


def test_synthetic_data_keeps_shape_and_classes(tmp_path):
    config = load_config("imagenet64_ict")
    synthetic = bench.with_synthetic_data(config, str(tmp_path))
    assert synthetic.data.name == "npz" and config.data.name == "array_shards"
    for field in ("image_size", "num_channels", "num_classes"):
        assert synthetic.data[field] == config.data[field]
    assert synthetic.model.num_classes == 1000
    with np.load(synthetic.data.path) as archive:
        assert archive["images"].shape == (1, 64, 64, 3) and archive["images"].dtype == np.uint8


@pytest.mark.parametrize("kwargs, message", [(dict(batch_size=0), "batch_size must be positive"),
                                             (dict(steps=0), "steps must be positive"),
                                             (dict(sample_batch=4), "sample_batch 4 must divide by")])
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.run_benchmark(load_config("quickstart"), **{"batch_size": BATCH, **kwargs})


@pytest.mark.slow
def test_bf16_consistency_benchmark_reports_errors_against_float32():
    """benchmarks/bf16_consistency.py on the tiny network: its rows, and their figures consistent."""
    config = tiny_config()
    result = bf16_consistency.measure(config, train_steps=2, batch=8, num_scales=1281, sigma_targets=[0.33],
                                      paper_batch=4096)
    assert [row["pairs"] for row in result["rows"]] == ["sigma 0.3304", "iCT mix"]
    for row in result["rows"]:
        assert 0 < row["delta_rel_err"] < 10 and 0 < row["grad_rel_err"] and -1 <= row["grad_cos"] <= 1 + 1e-6
        assert row["batch_noise_at_paper_batch"] == pytest.approx(row["batch_noise"] * math.sqrt(8 / 4096))
    assert result["rows"][0]["sigma_gap"] == pytest.approx(0.0094, abs=2e-4)  # adjacent at N = 1281 near 0.33
