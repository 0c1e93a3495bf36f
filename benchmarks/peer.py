"""Runs the PyTorch peer's harness beside `benchmarks/train_step.py`, interleaved, in one invocation.

The peer is the public PyTorch ECT code (locuslab/ect, EDM's SongUNet) timed
by its harness `bench_peer.py` (../shared/peer_bench/ in this project's
workspace; README there says how to set it up: a checkout of the peer beside
the harness, torch in its own virtualenv). The project never imports torch:
the harness runs in the peer's own Python, as a subprocess, and reports one
JSON line per configuration.

One round is: the peer's train step, the peer's one-step sampling, then ours
(train step and sampling), each in a fresh process, one process at a time, so
that each peak resident set belongs to one run alone and no two runs share the
CPU. Ratios are taken within a round (ours / peer, > 1: we are faster or use
less memory) and their median over the rounds is reported: machine load that
drifts between rounds then cancels out, which comparing against figures
measured elsewhere cannot do.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable

# The harness's --arch names, keyed by the trained parameter count of our network at the
# peer's 32x32x3 shape (SongUNet keeps the Fourier frequencies as a buffer, not a parameter).
PEER_ARCHS = {
    56_395_523: "ncsnpp",
    55_732_739: "ddpmpp",
    1_777_635: "small",
}
PEER_WARMUP = 2  # the harness's default: its first steps include allocator and thread-pool start-up


@dataclasses.dataclass(frozen=True)
class PeerHarness:
    python: str  # the peer's interpreter (a virtualenv with torch)
    script: str  # bench_peer.py, with the peer's checkout in src/ beside it
    threads: int  # torch intra-op threads (and OMP/MKL), = the cores our process may use

    def check(self) -> None:
        for what, path in (("--peer_python", self.python), ("--peer_harness", self.script)):
            if not os.path.isfile(path):
                raise ValueError(f"{what} {path!r} is not a file; see ../shared/peer_bench/README.md for the "
                                 f"peer's set-up (its virtualenv's python and bench_peer.py).")


def peer_arch(trained_param_count: int, image_shape: tuple[int, ...]) -> str:
    """The harness's network that matches ours, or ValueError saying which networks it has."""
    arch = PEER_ARCHS.get(trained_param_count) if tuple(image_shape) == (32, 32, 3) else None
    if arch is None:
        known = ", ".join(f"{name} ({count:,} params)" for count, name in PEER_ARCHS.items())
        raise ValueError(f"The peer harness has no network matching this one ({trained_param_count:,} trained "
                         f"params, image shape {tuple(image_shape)}); it has {known} at 32x32x3. Pass "
                         f"--peer_arch to choose one anyway.")
    return arch


def run_peer(harness: PeerHarness, arch: str, mode: str, batch: int, steps: int,
             warmup: int = PEER_WARMUP) -> dict[str, Any]:
    """One harness process for one configuration; its JSON result (sec_median, img_per_s, peak_rss_mib, ...)."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "peer.jsonl")
        command = [harness.python, harness.script, "--arch", arch, "--mode", mode, "--batch", str(batch),
                   "--steps", str(steps), "--warmup", str(warmup), "--threads", str(harness.threads),
                   "--json", out]
        env = {**os.environ, "OMP_NUM_THREADS": str(harness.threads), "MKL_NUM_THREADS": str(harness.threads)}
        _run(command, env, what=f"peer harness ({mode})")
        return _last_json_line(out, what=f"peer harness ({mode})")


def run_ours(argv: list[str], cwd: str) -> dict[str, Any]:
    """Our benchmark in a fresh process with the given arguments; its JSON result."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "ours.jsonl")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")]))}
        _run([sys.executable, "-m", "benchmarks.train_step", *argv, f"--json_out={out}"], env, what="ours",
             cwd=cwd)
        return _last_json_line(out, what="ours")


def _run(command: list[str], env: dict[str, str], what: str, cwd: str | None = None) -> None:
    done = subprocess.run(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        tail = "\n".join(done.stdout.splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")


def _last_json_line(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        return json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as e:
        raise RuntimeError(f"{what} wrote no result to {path}: {e}") from e


def interleave(run_peer_mode: Callable[[str], dict[str, Any]], run_ours_once: Callable[[], dict[str, Any]],
               rounds: int, with_sampling: bool) -> list[dict[str, Any]]:
    """`rounds` x (peer train, peer sample, ours), one after the other; the raw results of each."""
    results = []
    for _ in range(rounds):
        peer_train = run_peer_mode("train")
        peer_sample = run_peer_mode("sample") if with_sampling else None
        results.append({"peer_train": peer_train, "peer_sample": peer_sample, "ours": run_ours_once()})
    return results


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round figures of both sides and the median over rounds of each figure and of each ratio."""
    rows = []
    for r in rounds:
        ours, peer_train, peer_sample = r["ours"], r["peer_train"], r["peer_sample"]
        row = {
            "train_images_per_s": {"peer": peer_train["img_per_s"], "ours": ours["train_images_per_s"]},
            # Each process's peak resident set: the peer's train process, ours up to the end of training.
            "train_peak_rss_bytes": {"peer": peer_train["peak_rss_mib"] * 2**20,
                                     "ours": ours["peak_memory_train_bytes"]},
        }
        if peer_sample is not None and "sample_images_per_s" in ours:
            row["sample_images_per_s"] = {"peer": peer_sample["img_per_s"], "ours": ours["sample_images_per_s"]}
            # The peer samples in a process of its own; ours samples after training, in the same process.
            row["sample_peak_rss_bytes"] = {"peer": peer_sample["peak_rss_mib"] * 2**20,
                                            "ours": ours["peak_memory_bytes"]}
        for figure in row.values():
            figure["ratio"] = figure["ours"] / figure["peer"]
        rows.append(row)
    median = {name: {side: statistics.median(row[name][side] for row in rows) for side in ("peer", "ours", "ratio")}
              for name in rows[0]}
    return {"rounds": rows, "median": median}


_LABELS = {
    "train_images_per_s": ("images/s, train", "{:.2f}", "x faster"),
    "sample_images_per_s": ("images/s, 1-step sampling", "{:.2f}", "x faster"),
    "train_peak_rss_bytes": ("peak RSS, train process", "{:.2f} GB", "x the peer's"),
    "sample_peak_rss_bytes": ("peak RSS, sampling", "{:.2f} GB", "x the peer's"),
}


def format_same_run(summary: dict[str, Any], header: str) -> str:
    """A table: one column per round and the median, peer / ours / ratio for each figure."""
    def cell(name, figure):
        fmt = _LABELS[name][1]
        scale = 1e9 if name.endswith("bytes") else 1.0
        return f"{fmt.format(figure['peer'] / scale)} / {fmt.format(figure['ours'] / scale)} = {figure['ratio']:.2f}x"

    columns = [f"round {i + 1}" for i in range(len(summary["rounds"]))] + ["median"]
    lines = [header, "figure (peer / ours = ours/peer)  " + " | ".join(columns)]
    for name, (label, _, meaning) in _LABELS.items():
        if name not in summary["median"]:
            continue
        cells = [cell(name, row[name]) for row in summary["rounds"]] + [cell(name, summary["median"][name])]
        lines.append(f"{label} ({meaning})  " + " | ".join(cells))
    return "\n".join(lines)


def forwarded_argv(argv: list[str], drop: tuple[str, ...]) -> list[str]:
    """`argv` without the flags named in `drop` (as --name=value or --name value) and their values."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0].lstrip("-")
        if arg.startswith("--") and name in drop:
            skip_next = "=" not in arg
            continue
        kept.append(arg)
    return kept
