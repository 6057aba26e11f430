#!/usr/bin/env bash
# Larder's test command: installs what is missing (ops/install.sh), starts
# RabbitMQ, PostgreSQL and Garage in a throwaway directory
# (ops/services.sh), runs the workspace's test suite with cargo-nextest against
# them, then the fuzz smoke run (ops/fuzz.sh), and stops every
# service on the way out, also on failure or Ctrl-C.
#
#   ops/test.sh                          the whole suite, then `ops/fuzz.sh --total 60`
#   ops/test.sh -E 'test(services)'      a subset: arguments go to nextest,
#                                        and the fuzz run is skipped
#   ops/test.sh -p larder-db             one crate's tests
#
# Every phase a run should have is checked for first: a missing script
# fails the run before anything starts, rather than skipping its phase.
#
# Build artifacts go to $CARGO_TARGET_DIR, by default ~/.cache/larder/target,
# outside the checkout, so a fresh clone (as in CI) reuses earlier builds.
# Exits with the suite's status (or the fuzz run's, if the suite passed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/larder/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-auto}
# CI gets the profile that runs every test instead of stopping at the first
# failure (.config/nextest.toml).
if [[ -n ${CI:-} ]]; then
    export NEXTEST_PROFILE=${NEXTEST_PROFILE:-ci}
fi

run_started=$SECONDS
phase_started=$SECONDS
timings=()
say() { printf '\n==> %s\n' "$*" >&2; }
# Records how long the phase that just ended took.
phase_done() {
    timings+=("$(printf '%-10s %4d s' "$1" $((SECONDS - phase_started)))")
    phase_started=$SECONDS
}
print_timings() {
    printf '\n==> timings\n' >&2
    printf '    %s\n' "${timings[@]}" "$(printf '%-10s %4d s' total $((SECONDS - run_started)))" >&2
}

# A full run has every phase; a subset (arguments) no fuzz run.
phase_scripts=(install.sh services.sh)
if (($# == 0)); then
    phase_scripts+=(fuzz.sh)
fi
for script in "${phase_scripts[@]}"; do
    if [[ ! -f $repo/ops/$script ]]; then
        printf 'ops/test.sh: ops/%s is missing: a phase of this run would not run\n' "$script" >&2
        exit 1
    fi
done

# The whole workspace, unless the run names packages (`--workspace` would
# override `-p`).
nextest_args=(--workspace "$@")
for argument in "$@"; do
    case $argument in
        -p | -p* | --package | --package=*)
            nextest_args=("$@")
            break
            ;;
    esac
done

services_dir=
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $services_dir ]]; then
        phase_started=$SECONDS
        bash "$repo/ops/services.sh" stop "$services_dir" || status=1
        phase_done stop
        if ((status == 0)); then
            rm -rf "$services_dir"
        else
            printf '\n==> service logs kept in %s\n' "$services_dir" >&2
        fi
    fi
    print_timings
    exit "$status"
}
trap cleanup EXIT
# An interrupted run still stops the services (cleanup runs on the way out).
trap 'exit 130' INT
trap 'exit 143' TERM

say "installing what is missing (ops/install.sh)"
bash "$repo/ops/install.sh"
phase_done install

say "starting RabbitMQ, PostgreSQL and Garage (ops/services.sh)"
services_dir=$(mktemp -d "${TMPDIR:-/tmp}/larder-services.XXXXXX")
bash "$repo/ops/services.sh" start "$services_dir"
# shellcheck source=/dev/null
source "$services_dir/env"
phase_done services

# CLI and crash tests run the real binaries (ingest-api, the workers,
# larder): build them first and tell the tests where they are.
say "building the binaries (cargo build --workspace --bins)"
cargo build --workspace --bins
export LARDER_TEST_BIN_DIR="$CARGO_TARGET_DIR/debug"
phase_done build

say "running the test suite (cargo nextest run ${nextest_args[*]})"
suite_status=0
cargo nextest run "${nextest_args[@]}" || suite_status=$?
phase_done tests
((suite_status == 0)) || exit "$suite_status"

# The fuzz smoke run belongs to the full run; a subset is a developer's quick
# loop.
if (($# == 0)); then
    say "fuzz smoke run (ops/fuzz.sh --total 60: a minute split across the targets)"
    bash "$repo/ops/fuzz.sh" --total 60
    phase_done fuzz
fi
