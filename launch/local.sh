#!/usr/bin/env bash
# Runs consistency_jax on one machine (CPU, one GPU, or all local GPUs) as a
# single process. See usage() or run with --help.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh --config=FILE --workdir=DIR [options] [-- OVERRIDES...]

Runs `python -m consistency_jax.main` as a single process on this machine.
Paths are relative to the current directory (run it from the repository root).

Required:
  --config FILE     experiment config, e.g. configs/quickstart.py
  --workdir DIR     checkpoints, logs and samples go here

Options:
  --mode MODE       train (default of main.py), sample or eval
  --gpus LIST       only use these GPUs (sets CUDA_VISIBLE_DEVICES=LIST, e.g. 0,1)
  --cpu             run on the CPU even if an accelerator is present (JAX_PLATFORMS=cpu)
  --extra ARG       pass ARG to main.py, e.g. --extra=--config.training.num_steps=100
                    (repeatable; everything after `--` is passed the same way)
  --dry-run         print the command instead of running it
  -h, --help        show this help

Environment:
  PYTHON            interpreter to use (default: python)

Example:
  launch/local.sh --cpu --config=configs/quickstart.py --workdir=/tmp/quickstart \
    -- --config.training.num_steps=200
EOF
}

main() {
  local config="" workdir="" mode="" gpus="" use_cpu=0
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
      --config) expect_value "$flag" "$@"; config="$1"; shift ;;
      --workdir) expect_value "$flag" "$@"; workdir="$1"; shift ;;
      --mode) expect_value "$flag" "$@"; mode="$1"; shift ;;
      --gpus) expect_value "$flag" "$@"; gpus="$1"; shift ;;
      --cpu) use_cpu=1 ;;
      --extra) expect_value "$flag" "$@"; extra+=("$1"); shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) extra+=("$@"); break ;;
      *) die_usage "unknown argument '$flag'" ;;
    esac
  done
  require_flag --config "$config"
  require_flag --workdir "$workdir"
  if ((use_cpu)) && [[ -n "$gpus" ]]; then
    die_usage "--cpu and --gpus exclude each other"
  fi

  local -a environment=()
  if ((use_cpu)); then
    environment+=("JAX_PLATFORMS=cpu")
  fi
  if [[ -n "$gpus" ]]; then
    environment+=("CUDA_VISIBLE_DEVICES=$gpus")
  fi
  local -a command=("${PYTHON:-python}" -m consistency_jax.main
    "--config=$config" "--workdir=$workdir")
  if [[ -n "$mode" ]]; then
    command+=("--mode=$mode")
  fi
  command+=("${extra[@]}")
  if ((${#environment[@]} > 0)); then
    command=(env "${environment[@]}" "${command[@]}")
  fi
  run_command "${command[@]}"
}

main "$@"
