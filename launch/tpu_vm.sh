#!/usr/bin/env bash
# Trains consistency_jax on a Cloud TPU VM or pod slice: every worker gets the
# code and a Python environment, then runs the same command; JAX joins the
# workers into one job (main.py --distributed). See usage() or run with --help.
# Remote commands are expanded by the workers' shell, so their `~/` stays
# literal in this file.
# shellcheck disable=SC2088
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

# Where things live on every worker, relative to the login user's home.
readonly REMOTE_CODE_DIR="consistency_jax"
readonly REMOTE_VENV_DIR="consistency_jax_venv"
readonly REMOTE_LOG="consistency_jax_train.log"
readonly REMOTE_PID="consistency_jax_train.pid"
readonly POLL_SECONDS=30

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name=NAME --zone=ZONE [options] [-- OVERRIDES...]

Subcommands:
  create   create the TPU VM / pod slice (a queued resource with --queued)
  wait     block until the TPU is ready (only needed after `create --queued`)
  setup    copy or clone the code to every worker and install it with "jax[tpu]"
  train    start `python -m consistency_jax.main --distributed` on every worker
           under nohup; each worker logs to ~/consistency_jax_train.log
  logs     follow the training log of one worker (default: worker 0)
  stop     stop the training processes started by `train`
  delete   delete the TPU (and its queued resource with --queued)
  all      create, wait (with --queued), setup, train, then follow the logs

Required:
  --name NAME              TPU name (also the queued resource id with --queued)
  --zone ZONE              e.g. us-central2-b
  --accelerator-type TYPE  for create/all, e.g. v4-32, v5litepod-16
  --config FILE            for train/all, relative to the repository root,
                           e.g. configs/cifar10_ict.py
  --workdir gs://...       for train/all; a bucket every worker can write to

Options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --version RUNTIME        TPU software version (default: tpu-ubuntu2204-base;
                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                           v6e: v2-alpha-tpuv6e)
  --queued                 create/delete through `gcloud compute tpus queued-resources`
  --repo URL|PATH          code for setup: a git URL to clone on every worker, or a
                           local directory to copy (default: this checkout)
  --python-version X.Y     Python for the workers' environment (default: 3.11)
  --mode MODE              train (default of main.py), sample or eval
  --worker N               worker whose log `logs` follows (default: 0)
  --extra ARG              pass ARG to main.py, e.g. --extra=--config.training.num_steps=1000
                           (repeatable; everything after `--` is passed the same way)
  --dry-run                print every command, one per line, instead of running it
  -h, --help               show this help

Example:
  launch/tpu_vm.sh all --name=cm-v4 --zone=us-central2-b --accelerator-type=v4-32 \
    --config=configs/cifar10_ict.py --workdir=gs://my-bucket/cifar10_ict
  launch/tpu_vm.sh delete --name=cm-v4 --zone=us-central2-b
EOF
}

# Flags shared by every gcloud call: set by parse_arguments.
declare -a GCLOUD_LOCATION=()

tpu_ssh() {
  local name="$1" workers="$2" remote_command="$3"
  run_command gcloud compute tpus tpu-vm ssh "$name" "${GCLOUD_LOCATION[@]}" \
    "--worker=$workers" "--command=$remote_command"
}

create_tpu() {
  local name="$1" accelerator_type="$2" version="$3" queued="$4"
  if ((queued)); then
    run_command gcloud compute tpus queued-resources create "$name" "--node-id=$name" \
      "${GCLOUD_LOCATION[@]}" "--accelerator-type=$accelerator_type" \
      "--runtime-version=$version"
  else
    run_command gcloud compute tpus tpu-vm create "$name" "${GCLOUD_LOCATION[@]}" \
      "--accelerator-type=$accelerator_type" "--version=$version"
  fi
}

# A queued resource is usable once ACTIVE, a plain TPU VM once READY.
wait_until_ready() {
  local name="$1" queued="$2"
  local -a describe
  local ready_state
  if ((queued)); then
    describe=(gcloud compute tpus queued-resources describe "$name" "${GCLOUD_LOCATION[@]}"
      "--format=value(state.state)")
    ready_state="ACTIVE"
  else
    describe=(gcloud compute tpus tpu-vm describe "$name" "${GCLOUD_LOCATION[@]}"
      "--format=value(state)")
    ready_state="READY"
  fi
  if ((DRY_RUN)); then
    run_command "${describe[@]}"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    printf '%s is %s\n' "$name" "${state:-unknown}" >&2
    case "$state" in
      "$ready_state") return ;;
      FAILED | SUSPENDED) die "$name is $state; delete it and create it again" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

# A git URL is cloned (or fast-forwarded) on every worker; a local directory
# is copied, after removing the previous copy so scp does not nest it.
fetch_code() {
  local name="$1" repo="$2"
  if [[ -d "$repo" ]]; then
    tpu_ssh "$name" all "rm -rf ~/$REMOTE_CODE_DIR"
    run_command gcloud compute tpus tpu-vm scp --recurse "$repo" "$name:$REMOTE_CODE_DIR" \
      "${GCLOUD_LOCATION[@]}" --worker=all
  else
    local url
    url="$(quote_word "$repo")"
    tpu_ssh "$name" all "if [ -d ~/$REMOTE_CODE_DIR/.git ]; then git -C ~/$REMOTE_CODE_DIR pull --ff-only; else git clone $url ~/$REMOTE_CODE_DIR; fi"
  fi
}

# TPU images ship an older system Python than the package needs, so uv
# provides the requested one in a virtualenv. jax[tpu] and the package are
# installed in one pip call so the resolver picks a jax (and matching libtpu)
# that satisfies the package's own jax bounds.
install_environment() {
  local name="$1" python_version="$2"
  local venv="~/$REMOTE_VENV_DIR"
  tpu_ssh "$name" all "set -e; python3 -m pip install --user --upgrade uv; [ -x $venv/bin/python ] || ~/.local/bin/uv venv --seed --python $(quote_word "$python_version") $venv; $venv/bin/python -m pip install --upgrade 'jax[tpu]' -e ~/$REMOTE_CODE_DIR"
}

# Prints main.py's command line with every word quoted for the remote shell.
remote_main_command() {
  local word
  printf '~/%s/bin/python -m consistency_jax.main' "$REMOTE_VENV_DIR"
  for word in "$@"; do
    printf ' %s' "$(quote_word "$word")"
  done
}

start_training() {
  local name="$1"
  shift
  local main_command
  main_command="$(remote_main_command "$@")"
  # nohup plus redirecting all three streams lets ssh return while training
  # keeps running; the pid file is what `stop` kills.
  tpu_ssh "$name" all "cd ~/$REMOTE_CODE_DIR && nohup $main_command > ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/$REMOTE_PID"
}

stop_training() {
  local name="$1"
  tpu_ssh "$name" all "if [ -f ~/$REMOTE_PID ]; then kill \$(cat ~/$REMOTE_PID) || true; rm -f ~/$REMOTE_PID; fi"
}

follow_log() {
  local name="$1" worker="$2"
  tpu_ssh "$name" "$worker" "tail -n 200 -F ~/$REMOTE_LOG"
}

delete_tpu() {
  local name="$1" queued="$2"
  if ((queued)); then
    # --force deletes the TPU node together with its queued resource.
    run_command gcloud compute tpus queued-resources delete "$name" "${GCLOUD_LOCATION[@]}" \
      --force --quiet
  else
    run_command gcloud compute tpus tpu-vm delete "$name" "${GCLOUD_LOCATION[@]}" --quiet
  fi
}

main() {
  (($# > 0)) || die_usage "a subcommand is required (create, wait, setup, train, logs, stop, delete or all)"
  case "$1" in
    -h | --help) usage; exit 0 ;;
    create | wait | setup | train | logs | stop | delete | all) ;;
    *) die_usage "unknown subcommand '$1' (valid: create, wait, setup, train, logs, stop, delete, all)" ;;
  esac
  local subcommand="$1"
  shift

  local name="" zone="" project="" accelerator_type="" version="tpu-ubuntu2204-base"
  local queued=0 repo="" config="" workdir="" mode="" worker=0 python_version="3.11"
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
      --name) expect_value "$flag" "$@"; name="$1"; shift ;;
      --zone) expect_value "$flag" "$@"; zone="$1"; shift ;;
      --project) expect_value "$flag" "$@"; project="$1"; shift ;;
      --accelerator-type) expect_value "$flag" "$@"; accelerator_type="$1"; shift ;;
      --version) expect_value "$flag" "$@"; version="$1"; shift ;;
      --queued) queued=1 ;;
      --repo) expect_value "$flag" "$@"; repo="$1"; shift ;;
      --python-version) expect_value "$flag" "$@"; python_version="$1"; shift ;;
      --config) expect_value "$flag" "$@"; config="$1"; shift ;;
      --workdir) expect_value "$flag" "$@"; workdir="$1"; shift ;;
      --mode) expect_value "$flag" "$@"; mode="$1"; shift ;;
      --worker) expect_value "$flag" "$@"; worker="$1"; shift ;;
      --extra) expect_value "$flag" "$@"; extra+=("$1"); shift ;;
      --dry-run) DRY_RUN=1 ;;
      --) extra+=("$@"); break ;;
      *) die_usage "unknown argument '$flag'" ;;
    esac
  done

  # Check everything the subcommand will need before touching any resource,
  # so `all` cannot create a TPU and then stop for a missing flag.
  require_flag --name "$name"
  require_flag --zone "$zone"
  if [[ "$subcommand" == create || "$subcommand" == all ]]; then
    require_flag --accelerator-type "$accelerator_type" "for '$subcommand'"
  fi
  if [[ "$subcommand" == train || "$subcommand" == all ]]; then
    require_flag --config "$config" "for '$subcommand'"
    require_flag --workdir "$workdir" "for '$subcommand'"
    # Every worker writes checkpoints to the same place, so it must be shared.
    [[ "$workdir" == gs://?* ]] ||
      die_usage "--workdir must be a gs:// path that all workers share, got '$workdir'"
  fi
  [[ "$worker" =~ ^[0-9]+$ ]] || die_usage "--worker must be a worker index (0, 1, ...), got '$worker'"
  if [[ -z "$repo" ]]; then
    repo="$(repo_root)"
  elif [[ ! -d "$repo" && ! "$repo" =~ ^(https?|ssh|git)://|^git@ ]]; then
    die_usage "--repo must be a local directory or a git URL (https://, ssh://, git://, git@), got '$repo'"
  fi

  GCLOUD_LOCATION=("--zone=$zone")
  if [[ -n "$project" ]]; then
    GCLOUD_LOCATION+=("--project=$project")
  fi
  local -a main_flags=("--config=$config" "--workdir=$workdir" --distributed)
  if [[ -n "$mode" ]]; then
    main_flags+=("--mode=$mode")
  fi
  main_flags+=("${extra[@]}")

  case "$subcommand" in
    create) create_tpu "$name" "$accelerator_type" "$version" "$queued" ;;
    wait) wait_until_ready "$name" "$queued" ;;
    setup)
      fetch_code "$name" "$repo"
      install_environment "$name" "$python_version"
      ;;
    train) start_training "$name" "${main_flags[@]}" ;;
    logs) follow_log "$name" "$worker" ;;
    stop) stop_training "$name" ;;
    delete) delete_tpu "$name" "$queued" ;;
    all)
      create_tpu "$name" "$accelerator_type" "$version" "$queued"
      # A plain create returns once the TPU is ready; a queued one may wait.
      if ((queued)); then
        wait_until_ready "$name" "$queued"
      fi
      fetch_code "$name" "$repo"
      install_environment "$name" "$python_version"
      start_training "$name" "${main_flags[@]}"
      follow_log "$name" "$worker"
      ;;
  esac
}

main "$@"
