"""Speed and memory of the iCT train step and of one-step sampling, for a config and batch size.

Runs the exact code training runs (experiment.create_experiment and
train.jit_train_step; evaluation.generate.make_sampler for sampling) on
synthetic batches of the config's image shape: the configured dataset is
swapped for a one-image .npz, so nothing needs downloading and the input
pipeline is not timed (benchmarks/input_pipeline.py times it).

Reports: parameter count; compile time (lowering + XLA compilation, timed
apart from running); the median steady-state step time over --steps steps,
as steps/s and images/s; one-step sampling images/s; and peak memory (on
GPU/TPU the largest device's peak_bytes_in_use, on CPU the process's peak
resident set, which includes compilation). Since other jobs on a shared
machine slow it down, it also reports the cores XLA can use, the load average
before and after, and the process CPU time per step.

Same-run comparison with the PyTorch peer (--peer_python, --peer_harness):
the peer's harness (bench_peer.py, the public PyTorch ECT code's SongUNet on
the same iCT step; ../shared/peer_bench/README.md sets it up, torch in its own
virtualenv) and this benchmark run interleaved, one process at a time (peer
train, peer sampling, ours; --rounds times), and the table gives each
round's figures and the median of the per-round ratios: train and sampling
images/s and peak RSS, all from this run on this machine (benchmarks/peer.py).

Without the peer: where the network, batch and machine kind match a figure of
the project's reference table BENCHMARKS.md (float32, 2-vCPU CPU; copied
into PEER_FIGURES), the table gives the ratio to that figure as a fallback,
labelled "vs peer (BENCHMARKS.md figures, not this run)": figures an outside
harness measured on another host, not a baseline measured in the same run.

Usage:
  python -m benchmarks.train_step --config=configs/cifar10_ict.py --batch_size=8 [--steps=5] \
      [--sample_batch=64] [--json_out=results.jsonl] [--config.model.dtype=bfloat16 ...]
  python -m benchmarks.train_step --config=configs/cifar10_ict.py --batch_size=8 --sample_batch=64 \
      --peer_python=$PEER/venv/bin/python --peer_harness=$PEER/bench_peer.py [--rounds=2]
"""

import copy
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import peer as peer_run
from consistency_jax import host_memory, methods, parallel, train
from consistency_jax.evaluation import generate
from consistency_jax.experiment import Experiment, create_experiment, validate_config
from consistency_jax.models import count_params, create_model


# ----------------------------------------------------------------------------
# The peer's figures (BENCHMARKS.md): PyTorch ECT, float32, 2-vCPU CPU machine.
# A fallback for runs without the peer (--peer_python): measured elsewhere.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerFigures:
    network: str
    step_seconds: dict[int, float]  # train batch size -> seconds per step
    sample_images_per_s: float  # one-step sampling at PEER_SAMPLE_BATCH
    peak_rss_gb: dict[int, float]  # train batch size -> peak resident set


PEER_SAMPLE_BATCH = 64
PEER_IMAGE_SHAPE = (32, 32, 3)
# Keyed by trained parameter count (the peer keeps the Fourier frequencies as a buffer, so its counts
# leave them out): each network of the table has a different one.
PEER_FIGURES = {
    56_395_523: PeerFigures("NCSN++ CIFAR-10", {8: 14.0, 32: 62.8}, 2.16, {8: 2.5, 32: 6.1}),
    55_732_739: PeerFigures("DDPM++ CIFAR-10", {8: 11.7}, 2.26, {8: 2.5}),
    1_777_635: PeerFigures("small NCSN++-style (32 ch)", {32: 1.99}, 61.7, {32: 1.1}),
}


def peer_comparison(param_count: int, image_shape: tuple[int, ...], dtype: str, platform: str,
                    batch_size: int, step_seconds: float, sample_batch: int,
                    sample_images_per_s: float | None) -> dict[str, Any] | None:
    """Ratios to the peer's figures (> 1: faster than the peer), or None where no figure applies.

    Only a float32 run on CPU of a network of the table at the same image shape
    is comparable; train and sampling ratios need the peer's batch sizes.
    """
    peer = PEER_FIGURES.get(param_count)
    if peer is None or tuple(image_shape) != PEER_IMAGE_SHAPE or dtype != "float32" or platform != "cpu":
        return None
    comparison: dict[str, Any] = {"network": peer.network}
    if batch_size in peer.step_seconds:
        comparison["train_step_seconds"] = peer.step_seconds[batch_size]
        comparison["train_speedup"] = peer.step_seconds[batch_size] / step_seconds
        comparison["peak_rss_bytes"] = peer.peak_rss_gb[batch_size] * 1e9
    if sample_images_per_s is not None and sample_batch == PEER_SAMPLE_BATCH:
        comparison["sample_images_per_s"] = peer.sample_images_per_s
        comparison["sample_speedup"] = sample_images_per_s / peer.sample_images_per_s
    return comparison


# ----------------------------------------------------------------------------
# Measuring.
# ----------------------------------------------------------------------------


def with_synthetic_data(config: ml_collections.ConfigDict, directory: str,
                        num_images: int = 1) -> ml_collections.ConfigDict:
    """A copy of the config whose training data is `num_images` random images of the same shape and classes.

    The timed steps use synthetic_batch, not this data; it only has to pass validation (a batch of at most
    num_images examples).
    """
    data = config.data
    rng = np.random.default_rng(0)
    path = os.path.join(directory, "synthetic.npz")
    shape = (num_images, data.image_size, data.image_size, data.num_channels)
    np.savez(path, images=rng.integers(0, 256, shape, dtype=np.uint8), labels=np.zeros((num_images,), np.int32))
    config = copy.deepcopy(config)  # keeps the config's field references (e.g. model.num_classes)
    config.data.name = "npz"
    config.data.path = path
    # Nothing is evaluated: validation must not ask for the Inception weights of the config's FID.
    config.eval.at_end, config.eval.every_steps = False, 0
    return config


def synthetic_batch(experiment: Experiment, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
    """A global batch as the input pipeline yields it (images in [-1, 1], labels if conditional), on the mesh."""
    rng = np.random.default_rng([seed, jax.process_index()])
    local_size = batch_size // jax.process_count()
    batch = {"image": rng.uniform(-1, 1, (local_size, *experiment.image_shape)).astype(np.float32)}
    if experiment.num_classes > 0:
        batch["label"] = rng.integers(0, experiment.num_classes, (local_size,)).astype(np.int32)
    return parallel.global_batch(batch, experiment.mesh)


def _seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def _compile(jitted: Callable, *args: Any) -> tuple[float, Callable]:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return time.perf_counter() - start, compiled


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): the devices' peak allocation where reported, else the process peak RSS."""
    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
    if peaks:
        return max(peaks), "device peak_bytes_in_use (largest device)"
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return (kib_or_bytes if sys.platform == "darwin" else kib_or_bytes * 1024), "process peak RSS"


def current_rss_bytes() -> int | None:
    """The process's resident set now (Linux), to read the peak against; None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def host_cpu() -> str:
    """The CPU model and its widest vector unit (XLA CPU speed differs ~3x between AVX2 and AVX-512 hosts)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{model}, {isa}"


def _process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time_train(experiment: Experiment, batch_size: int, steps: int) -> tuple[dict[str, Any], Any]:
    init_seconds, state = _seconds(experiment.create_state)
    batch = synthetic_batch(experiment, batch_size)
    compile_seconds, step = _compile(train.jit_train_step(experiment), state, batch)
    peak_after_compile, _ = peak_memory()
    first_seconds, (state, _) = _seconds(lambda: step(state, batch))  # one-off run-time set-up
    step_seconds = []
    cpu_start = _process_cpu_seconds()
    for _ in range(steps):
        seconds, (state, metrics) = _seconds(lambda: step(state, batch))
        step_seconds.append(seconds)
    cpu_per_step = (_process_cpu_seconds() - cpu_start) / steps
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError("The benchmarked train step produced a non-finite loss.")
    median = statistics.median(step_seconds)
    result = {
        "param_count": count_params(state.params),
        # Without the frozen Fourier frequencies: the count of networks that keep them as a buffer (EDM, the peer).
        "trained_param_count": count_params(state.params, trainable_only=True),
        "init_s": init_seconds,
        "compile_s": compile_seconds,
        "peak_memory_after_compile_bytes": peak_after_compile,
        "first_step_s": first_seconds,
        "step_seconds": step_seconds,
        "step_s_median": median,
        "steps_per_s": 1.0 / median,
        "train_images_per_s": batch_size / median,
        # Busy-machine aid: CPU time the process spent per step, all threads together.
        "cpu_s_per_step": cpu_per_step,
    }
    return result, state.params


def _time_sampling(experiment: Experiment, params: Any, sample_batch: int, repeats: int) -> dict[str, Any]:
    rng = jax.random.PRNGKey(0)
    labels = synthetic_batch(experiment, sample_batch, seed=1).get("label")
    if labels is None:  # the sampler takes labels even when unconditional, and ignores them
        local_size = sample_batch // jax.process_count()
        labels = parallel.global_batch({"label": np.zeros((local_size,), np.int32)}, experiment.mesh)["label"]
    compile_seconds, sample = _compile(generate.make_sampler(experiment, num_steps=1)[1], params, rng, labels)
    _seconds(lambda: sample(params, rng, labels))
    seconds = [_seconds(lambda: sample(params, jax.random.fold_in(rng, i), labels))[0] for i in range(repeats)]
    median = statistics.median(seconds)
    return {
        "sample_compile_s": compile_seconds,
        "sample_seconds": seconds,
        "sample_s_median": median,
        "sample_images_per_s": sample_batch / median,
    }


def _check_positive(name: str, value: int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}.")


def run_benchmark(config: ml_collections.ConfigDict, batch_size: int | None = None, steps: int = 5,
                  sample_batch: int = 64, sample_repeats: int = 3) -> dict[str, Any]:
    """Measures the train step and one-step sampling of `config`; returns every figure in a flat dict."""
    batch_size = config.training.batch_size if batch_size is None else batch_size
    _check_positive("batch_size", batch_size)
    _check_positive("steps", steps)
    _check_positive("sample_batch", sample_batch, allow_zero=True)
    _check_positive("sample_repeats", sample_repeats)
    load_start = os.getloadavg()[0]
    rss_start = current_rss_bytes()  # imports (JAX, orbax; no TensorFlow since train.py dropped clu) before any network exists
    parallel.use_cpu_devices(config.mesh.cpu_devices)  # as main.py does: the quickstarts use 2
    with tempfile.TemporaryDirectory() as directory:
        config = with_synthetic_data(config, directory, num_images=batch_size)
        config.training.batch_size = batch_size
        validate_config(config)
        host_memory.keep_freed_memory_on_cpu()  # as main.py does
        experiment = create_experiment(config)
        if sample_batch % experiment.mesh.size:
            raise ValueError(f"sample_batch {sample_batch} must divide by the number of devices in the mesh "
                             f"({experiment.mesh.size}); choose a multiple of {experiment.mesh.size}.")
        result, params = _time_train(experiment, batch_size, steps)
        result["peak_memory_train_bytes"], memory_source = peak_memory()
        if sample_batch:
            result.update(_time_sampling(experiment, params, sample_batch, sample_repeats))
    result["peak_memory_bytes"], _ = peak_memory()
    device = jax.devices()[0]
    result.update({
        "model": config.model.name,
        "dtype": config.model.get("dtype", "float32"),
        "image_shape": list(experiment.image_shape),
        "num_classes": experiment.num_classes,
        "batch_size": batch_size,
        "steps": steps,
        "sample_batch": sample_batch,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": experiment.mesh.size,
        "cpu_cores": cpu_cores(),
        "host_cpu": host_cpu(),
        "load_avg_1m": [load_start, os.getloadavg()[0]],
        "memory_measure": memory_source,
        "rss_at_start_bytes": rss_start,
        "xla_optimizations": not jax.config.read("jax_disable_most_optimizations"),
        "jax_version": jax.__version__,
    })
    result["vs_peer"] = peer_comparison(
        result["trained_param_count"], experiment.image_shape, result["dtype"], result["platform"], batch_size,
        result["step_s_median"], sample_batch, result.get("sample_images_per_s"))
    return result


# ----------------------------------------------------------------------------
# Reporting.
# ----------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    gb = 1e9
    shape = "x".join(map(str, result["image_shape"]))
    rows = [
        ("network", f"{result['model']} ({result['dtype']}), {result['param_count']:,} params, {shape}"
                    + (f", {result['num_classes']} classes" if result["num_classes"] else "")),
        ("machine", f"{result['platform']} {result['device_kind']}, {result['num_devices']} device(s), "
                    f"{result['cpu_cores']} CPU cores ({result['host_cpu']}), load avg (1 min) "
                    f"{result['load_avg_1m'][0]:.2f} -> {result['load_avg_1m'][1]:.2f}"),
        ("train batch", f"{result['batch_size']}"),
        ("compile (train step)", f"{result['compile_s']:.1f} s"),
        ("train step (median)", f"{result['step_s_median']:.3f} s over {result['steps']} steps "
                                f"(min {min(result['step_seconds']):.3f}, max {max(result['step_seconds']):.3f})"),
        ("steps/s", f"{result['steps_per_s']:.3f}"),
        ("images/s (train)", f"{result['train_images_per_s']:.2f}"),
        ("process CPU time / step", f"{result['cpu_s_per_step']:.3f} s (all threads)"),
        ("peak memory (train)", f"{result['peak_memory_train_bytes'] / gb:.2f} GB ({result['memory_measure']}; "
                                f"{result['peak_memory_after_compile_bytes'] / gb:.2f} GB after compiling)"),
    ]
    if result["rss_at_start_bytes"] is not None:
        rows.append(("RSS before the network", f"{result['rss_at_start_bytes'] / gb:.2f} GB (imports)"))
    if result["sample_batch"]:
        rows += [
            ("compile (1-step sampler)", f"{result['sample_compile_s']:.1f} s"),
            ("1-step sampling", f"{result['sample_images_per_s']:.2f} images/s at batch {result['sample_batch']}"),
            ("peak memory (overall)", f"{result['peak_memory_bytes'] / gb:.2f} GB"),
        ]
    peer = result["vs_peer"]
    if peer:
        if "train_speedup" in peer:
            rows.append(("vs peer (BENCHMARKS.md figures, not this run), train",
                         f"{peer['train_speedup']:.2f}x (peer {peer['train_step_seconds']} s/step, "
                         f"{peer['peak_rss_bytes'] / gb:.1f} GB peak RSS)"))
        if "sample_speedup" in peer:
            rows.append(("vs peer (BENCHMARKS.md figures, not this run), sampling",
                         f"{peer['sample_speedup']:.2f}x (peer {peer['sample_images_per_s']} images/s)"))
    if not result["xla_optimizations"]:
        rows.append(("WARNING", "jax_disable_most_optimizations is on: these timings are not representative"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


PEER_FLAGS = ("peer_python", "peer_harness", "peer_arch", "rounds", "json_out")


def _define_flags() -> None:
    # Defined only when run as a script, so that importing this module next to
    # consistency_jax.main (which also defines --config) does not clash.
    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
    flags.DEFINE_integer("batch_size", None, "Global train batch size (default: the config's).")
    flags.DEFINE_integer("steps", 5, "Timed train steps after one warm-up step; the median is reported.")
    flags.DEFINE_integer("sample_batch", 64, "One-step sampling batch size; 0 skips sampling.")
    flags.DEFINE_integer("sample_repeats", 3, "Timed sampling calls after one warm-up call.")
    flags.DEFINE_string("json_out", None, "Append the result as one JSON line to this file.")
    flags.DEFINE_string("peer_python", None, "The PyTorch peer's Python (its virtualenv's bin/python): run the "
                        "peer's harness interleaved with this benchmark and report same-run ratios.")
    flags.DEFINE_string("peer_harness", None, "The peer's bench_peer.py, with the peer's checkout in src/ beside "
                        "it (../shared/peer_bench/README.md).")
    flags.DEFINE_string("peer_arch", None, "The harness's network (ncsnpp, ddpmpp, small, small_ddpmpp); "
                        "default: the one with this network's parameter count.")
    flags.DEFINE_integer("rounds", 2, "Same-run comparison: rounds of (peer train, peer sampling, ours).")
    flags.mark_flags_as_required(["config"])


def trained_param_count(config: ml_collections.ConfigDict) -> int:
    """The network's trained parameter count, from shapes alone (nothing is initialised or compiled)."""
    fn = methods.get_method(config.method.name).make_function(config, create_model(config.model))
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    params = jax.eval_shape(lambda rng: fn.init(rng, shape, config.data.num_classes > 0), jax.random.PRNGKey(0))
    return count_params(params, trainable_only=True)


def run_same_run_comparison(args: Any, argv: list[str]) -> tuple[dict[str, Any], str]:
    """--rounds x (peer train, peer sampling, ours), each its own process; the summary and its table."""
    harness = peer_run.PeerHarness(python=args.peer_python, script=args.peer_harness, threads=cpu_cores())
    harness.check()
    config = args.config
    batch_size = config.training.batch_size if args.batch_size is None else args.batch_size
    _check_positive("rounds", args.rounds)
    image_shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    arch = args.peer_arch or peer_run.peer_arch(trained_param_count(config), image_shape)
    ours_argv = peer_run.forwarded_argv(argv[1:], PEER_FLAGS)
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load_start = os.getloadavg()[0]
    rounds = peer_run.interleave(
        lambda mode: peer_run.run_peer(harness, arch, mode, batch_size if mode == "train" else args.sample_batch,
                                       args.steps if mode == "train" else args.sample_repeats),
        lambda: peer_run.run_ours(ours_argv, repo_root), args.rounds, with_sampling=args.sample_batch > 0)
    summary = peer_run.summarize(rounds)
    first_peer = rounds[0]["peer_train"]
    summary.update({
        "peer": {"harness": harness.script, "python": harness.python, "arch": arch, "threads": harness.threads,
                 "torch": first_peer.get("torch"), "params": first_peer.get("params")},
        "batch_size": batch_size, "sample_batch": args.sample_batch, "steps": args.steps,
        "host_cpu": host_cpu(), "load_avg_1m": [load_start, os.getloadavg()[0]],
        "raw": rounds,
    })
    header = (f"Same run, interleaved ({args.rounds} x peer train, peer sampling, ours; one process at a time) on "
              f"{summary['host_cpu']}, {harness.threads} cores, load avg (1 min) {load_start:.2f} -> "
              f"{summary['load_avg_1m'][1]:.2f}\npeer: {harness.script} --arch {arch} (torch "
              f"{summary['peer']['torch']}, {summary['peer']['params']:,} params, {harness.threads} threads); "
              f"train batch {batch_size}, sampling batch {args.sample_batch}")
    return summary, peer_run.format_same_run(summary, header)


def main(argv: list[str]) -> None:
    args = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(args.peer_python) != bool(args.peer_harness):
        raise app.UsageError("--peer_python and --peer_harness go together: the peer's interpreter and its "
                             "bench_peer.py (../shared/peer_bench/README.md).")
    if args.peer_python:
        summary, table = run_same_run_comparison(args, sys.argv)
        print(format_table(summary["raw"][-1]["ours"]))
        print(table)
        line = json.dumps({"same_run": summary})
    else:
        result = run_benchmark(args.config, args.batch_size, args.steps, args.sample_batch, args.sample_repeats)
        print(format_table(result))
        line = json.dumps(result)
    print(line)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
