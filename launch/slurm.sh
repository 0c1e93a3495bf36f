#!/usr/bin/env bash
# Submits launch/slurm.sbatch with a consistent resource request: one task
# (one JAX process) per GPU on every node. See usage() or run with --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --nodes=N --gpus-per-node=G --config=FILE --workdir=DIR [options] [-- OVERRIDES...]

Submits launch/slurm.sbatch, which runs one `python -m consistency_jax.main
--distributed` process per GPU on N nodes (N*G processes in one JAX job).
The job starts in the repository root, so --config is relative to it; the
workdir must be on a file system that every node sees.

Required:
  --nodes N           number of nodes
  --gpus-per-node G   GPUs (and processes) per node
  --config FILE       experiment config, e.g. configs/cifar10_ict.py
  --workdir DIR       shared directory for checkpoints, logs and samples

Options:
  --partition NAME    SLURM partition
  --time LIMIT        wall-clock limit, e.g. 2-00:00:00
  --account NAME      account to charge
  --job-name NAME     job name (default: consistency_jax)
  --mode MODE         train (default of main.py), sample or eval
  --extra ARG         pass ARG to main.py, e.g. --extra=--config.training.num_steps=1000
                      (repeatable; everything after `--` is passed the same way)
  --dry-run           print the sbatch command instead of submitting it
  -h, --help          show this help

Environment:
  PYTHON              interpreter on the nodes (default: python); activate the
                      environment that has consistency_jax before submitting

Example:
  launch/slurm.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=1-00:00:00 \
    --config=configs/cifar10_ict.py --workdir=/shared/runs/cifar10_ict
EOF
}

main() {
  local nodes="" gpus_per_node="" config="" workdir="" mode=""
  local partition="" time_limit="" account="" job_name="consistency_jax"
  local -a extra=()
  local flag
  while (($# > 0)); do
    flag="$1"
    shift
    if [[ "$flag" == --*=* ]]; then
      set -- "${flag#*=}" "$@"
      flag="${flag%%=*}"
    fi
    case "$flag" in
      -h | --help) usage; exit 0 ;;
      --nodes) expect_value "$flag" "$@"; nodes="$1"; shift ;;
      --gpus-per-node) expect_value "$flag" "$@"; gpus_per_node="$1"; shift ;;
      --config) expect_value "$flag" "$@"; config="$1"; shift ;;
      --workdir) expect_value "$flag" "$@"; workdir="$1"; shift ;;
      --partition) expect_value "$flag" "$@"; partition="$1"; shift ;;
      --time) expect_value "$flag" "$@"; time_limit="$1"; shift ;;
      --account) expect_value "$flag" "$@"; account="$1"; shift ;;
      --job-name) expect_value "$flag" "$@"; job_name="$1"; shift ;;
      --mode) expect_value "$flag" "$@"; mode="$1"; shift ;;
      --extra) expect_value "$flag" "$@"; extra+=("$1"); shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) extra+=("$@"); break ;;
      *) die_usage "unknown argument '$flag'" ;;
    esac
  done
  require_flag --nodes "$nodes"
  require_flag --gpus-per-node "$gpus_per_node"
  require_flag --config "$config"
  require_flag --workdir "$workdir"
  require_positive_int --nodes "$nodes"
  require_positive_int --gpus-per-node "$gpus_per_node"

  local root
  root="$(repo_root)"
  local -a command=(sbatch "--nodes=$nodes" "--ntasks-per-node=$gpus_per_node"
    "--gpus-per-node=$gpus_per_node" "--job-name=$job_name" "--chdir=$root")
  if [[ -n "$partition" ]]; then
    command+=("--partition=$partition")
  fi
  if [[ -n "$time_limit" ]]; then
    command+=("--time=$time_limit")
  fi
  if [[ -n "$account" ]]; then
    command+=("--account=$account")
  fi
  command+=("$root/launch/slurm.sbatch" "--config=$config" "--workdir=$workdir")
  if [[ -n "$mode" ]]; then
    command+=("--mode=$mode")
  fi
  command+=("${extra[@]}")
  run_command "${command[@]}"
}

main "$@"
