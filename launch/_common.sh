# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own).
#
# Every command a script would run goes through run_command, so --dry-run
# prints exactly what would be executed: one command per line, each word
# quoted so the line can be pasted into a POSIX shell.

DRY_RUN=0

# Prints the message and the usage hint on stderr and exits with status 2,
# the conventional status for a command-line usage error.
die_usage() {
  printf 'error: %s\n' "$1" >&2
  printf "Run '%s --help' for usage.\n" "$(basename "$0")" >&2
  exit 2
}

die() {
  printf 'error: %s\n' "$1" >&2
  exit 1
}

# Quotes one word for a POSIX shell. Plain words stay readable; anything else
# is single-quoted, with embedded single quotes written as '\''.
quote_word() {
  local word="$1"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Joins the arguments into one shell-quoted command line (no newline).
format_command() {
  local word separator=""
  for word in "$@"; do
    printf '%s' "$separator"
    quote_word "$word"
    separator=" "
  done
}

# Prints the command under --dry-run; otherwise echoes it to stderr (so logs
# show what ran) and executes it.
run_command() {
  if ((DRY_RUN)); then
    format_command "$@"
    printf '\n'
  else
    printf '+ %s\n' "$(format_command "$@")" >&2
    "$@"
  fi
}

# Call as `expect_value FLAG "$@"` right after shifting FLAG off: fails unless
# a value follows it.
expect_value() {
  local flag="$1"
  shift
  (($# > 0)) || die_usage "$flag needs a value"
}

# Fails with the flag's name when a required flag was not given.
require_flag() {
  local flag="$1" value="$2" purpose="${3:-}"
  [[ -n "$value" ]] || die_usage "$flag is required${purpose:+ $purpose}"
}

require_positive_int() {
  local flag="$1" value="$2"
  [[ "$value" =~ ^[1-9][0-9]*$ ]] || die_usage "$flag must be a positive integer, got '$value'"
}

# The launch scripts live in <repo>/launch; configs/ paths are relative to <repo>.
repo_root() {
  cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}
