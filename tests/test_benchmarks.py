"""benchmarks/train_step.py: the reported figures are present and consistent with each other."""

import copy
import importlib.util
import json
import math
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import bf16_consistency
from benchmarks import peer
from benchmarks import train_step as bench
from consistency_jax import experiment
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


def quickstart_config():
    config = load_config("quickstart")
    config.mesh.cpu_devices = 0  # the session's 8 fake devices exist already; the split is fixed at backend start
    return config


@pytest.fixture(scope="module")
def quickstart_result():
    config = quickstart_config()
    # The quickstart at a fraction of its size (one 8-channel level): the figures' consistency is the point, and
    # the 8-device train step compiles several times faster.
    config.model.update(model_channels=8, channel_mult=(1,), attn_resolutions=())
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
    # A benchmark of a paper config runs without its FID's Inception weights (none exist on this machine).
    assert config.eval.feature_extractor == "inception" and not experiment.evaluates(synthetic, "train")
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
        bench.run_benchmark(quickstart_config(), **{"batch_size": BATCH, **kwargs})


# ----------------------------------------------------------------------------
# Same-run comparison with the peer (benchmarks/peer.py): the plumbing, with a stand-in harness.
# ----------------------------------------------------------------------------

FAKE_HARNESS = '''
import argparse, json, os, sys
ap = argparse.ArgumentParser()
for name in ("--arch", "--mode", "--json"):
    ap.add_argument(name)
for name in ("--batch", "--steps", "--warmup", "--threads"):
    ap.add_argument(name, type=int)
a = ap.parse_args()
with open(os.environ["FAKE_PEER_LOG"], "a") as log:
    log.write(json.dumps({"argv": sys.argv[1:], "omp": os.environ.get("OMP_NUM_THREADS")}) + "\\n")
if a.arch == "broken":
    sys.exit("no such network")
seconds = {"train": 2.0, "sample": 0.5}[a.mode]
result = dict(arch=a.arch, mode=a.mode, batch=a.batch, torch="fake", params=1, sec_median=seconds,
              img_per_s=a.batch / seconds, peak_rss_mib={"train": 1000.0, "sample": 500.0}[a.mode])
print(json.dumps(result))
with open(a.json, "a") as f:
    f.write(json.dumps(result) + "\\n")
'''


@pytest.fixture()
def fake_harness(tmp_path, monkeypatch):
    script = tmp_path / "bench_peer.py"
    script.write_text(FAKE_HARNESS)
    monkeypatch.setenv("FAKE_PEER_LOG", str(tmp_path / "calls.jsonl"))
    harness = peer.PeerHarness(python=sys.executable, script=str(script), threads=3)

    def calls():
        return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    return harness, calls


def test_peer_harness_runs_with_our_batch_steps_and_threads(fake_harness):
    harness, calls = fake_harness
    result = peer.run_peer(harness, "small", "train", batch=32, steps=4)
    assert result["img_per_s"] == pytest.approx(16.0) and result["peak_rss_mib"] == 1000.0
    (call,) = calls()
    argv = dict(zip(call["argv"][::2], call["argv"][1::2]))
    assert argv["--arch"] == "small" and argv["--mode"] == "train" and argv["--batch"] == "32"
    assert argv["--steps"] == "4" and argv["--warmup"] == str(peer.PEER_WARMUP) and argv["--threads"] == "3"
    assert call["omp"] == "3"  # OMP/MKL threads = the cores our process may use


def test_a_failing_peer_run_says_what_failed(fake_harness):
    harness, _ = fake_harness
    with pytest.raises(RuntimeError, match=r"(?s)peer harness \(train\) failed .*no such network"):
        peer.run_peer(harness, "broken", "train", batch=8, steps=1)


def test_rounds_interleave_peer_and_ours_and_ratios_come_from_each_round(fake_harness):
    harness, calls = fake_harness
    order = []
    ours_train = iter([32.0, 8.0])  # images/s of our two rounds: 2x, then 0.5x the fake peer's 16

    def run_peer_mode(mode):
        order.append(f"peer {mode}")
        return peer.run_peer(harness, "small", mode, batch=32 if mode == "train" else 64, steps=2)

    def run_ours():
        order.append("ours")
        return {"train_images_per_s": next(ours_train), "peak_memory_train_bytes": 2000 * 2**20,
                "sample_images_per_s": 256.0, "peak_memory_bytes": 2500 * 2**20}

    rounds = peer.interleave(run_peer_mode, run_ours, rounds=2, with_sampling=True)
    assert order == ["peer train", "peer sample", "ours"] * 2 and len(calls()) == 4
    summary = peer.summarize(rounds)
    assert [r["train_images_per_s"]["ratio"] for r in summary["rounds"]] == pytest.approx([2.0, 0.5])
    median = summary["median"]
    assert median["train_images_per_s"]["ratio"] == pytest.approx(1.25)
    assert median["sample_images_per_s"]["ratio"] == pytest.approx(256.0 / 128.0)
    assert median["train_peak_rss_bytes"]["ratio"] == pytest.approx(2.0)
    assert median["sample_peak_rss_bytes"]["ratio"] == pytest.approx(5.0)
    table = peer.format_same_run(summary, "header")
    assert "16.00 / 32.00 = 2.00x" in table and "16.00 / 8.00 = 0.50x" in table and "1.25x" in table
    assert "1.05 GB / 2.10 GB = 2.00x" in table  # 1000 MiB, in GB


def test_peer_arch_follows_the_parameter_count():
    assert peer.peer_arch(56_395_523, (32, 32, 3)) == "ncsnpp"
    assert peer.peer_arch(1_777_635, (32, 32, 3)) == "small"
    with pytest.raises(ValueError, match="no network matching"):
        peer.peer_arch(1_777_635, (64, 64, 3))
    small = load_config("cifar10_ict")
    small.model.update(dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2))
    assert bench.trained_param_count(small) == 1_777_635


def test_ours_gets_every_flag_but_the_peers():
    argv = ["--config=configs/cifar10_ict.py", "--config.model.model_channels=32", "--batch_size=32",
            "--peer_python", "/venv/bin/python", "--peer_harness=/p/bench_peer.py", "--rounds=3",
            "--json_out=x.jsonl", "--steps", "5"]
    assert peer.forwarded_argv(argv, bench.PEER_FLAGS) == [
        "--config=configs/cifar10_ict.py", "--config.model.model_channels=32", "--batch_size=32", "--steps", "5"]


def test_missing_peer_files_fail_clearly(tmp_path):
    harness = peer.PeerHarness(python=str(tmp_path / "nope"), script=str(tmp_path / "bench_peer.py"), threads=2)
    with pytest.raises(ValueError, match="--peer_python .* is not a file"):
        harness.check()


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
