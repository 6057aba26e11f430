#!/usr/bin/env bash
# Runs every cargo-fuzz target of Larder (each [[bin]] in fuzz/Cargo.toml)
# for a while, one after the other, and reports each one's runs and result.
#
#   ops/fuzz.sh [SECONDS_PER_TARGET]      each target this long (default 60)
#   ops/fuzz.sh --total SECONDS           SECONDS split evenly across the
#                                         targets, at least 5 each
#
# A long session is e.g. `ops/fuzz.sh 600` (10 minutes per target); the test
# suite's smoke run (ops/test.sh) is `ops/fuzz.sh --total 60`, so that its
# cost stays the same however many targets there are.
#
# Idempotent: installs cargo-fuzz if missing, builds every target, then runs
# each. Only stable Rust exists here, so RUSTC_BOOTSTRAP=1 lets it accept
# the sanitizer flags cargo-fuzz passes. A new target needs no change here:
# it is found in fuzz/Cargo.toml, its committed seeds are fuzz/seeds/TARGET/
# (read-only inputs) and its libFuzzer dictionary, if any, fuzz/TARGET.dict.
# The growing corpus lives outside the checkout ($LARDER_FUZZ_CORPUS,
# default ~/.cache/larder/fuzz-corpus/TARGET), builds in
# $LARDER_FUZZ_TARGET_DIR (default ~/.cache/larder/fuzz-target). Inputs run
# with at most 2 GiB of memory and 25 s each: more is a finding, like a
# crash. A failing target leaves its input in fuzz/artifacts/TARGET/, and
# the script exits non-zero after all targets have run.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
}

per_target=60
total=
case ${1:-} in
    --total)
        total=${2:-}
        [[ $total =~ ^[0-9]+$ ]] && ((total >= 1)) && (($# == 2)) || usage
        ;;
    -h | --help) usage ;;
    '') ;;
    *)
        per_target=$1
        [[ $per_target =~ ^[0-9]+$ ]] && ((per_target >= 1)) && (($# == 1)) || usage
        ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
target_dir=${LARDER_FUZZ_TARGET_DIR:-$HOME/.cache/larder/fuzz-target}
corpus_root=${LARDER_FUZZ_CORPUS:-$HOME/.cache/larder/fuzz-corpus}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# Every [[bin]] of fuzz/Cargo.toml, as cargo-fuzz sees them.
mapfile -t targets < <(cargo fuzz list)
((${#targets[@]})) || {
    echo "==> no fuzz targets in fuzz/Cargo.toml" >&2
    exit 1
}
if [[ -n $total ]]; then
    per_target=$((total / ${#targets[@]}))
    ((per_target >= 5)) || per_target=5
fi

echo "==> building ${#targets[@]} fuzz targets: ${targets[*]}" >&2
cargo fuzz build --target-dir "$target_dir"

summary=()
failed=()
for target in "${targets[@]}"; do
    corpus=$corpus_root/$target
    mkdir -p "$corpus"
    inputs=("$corpus")
    [[ -d seeds/$target ]] && inputs+=("seeds/$target")
    options=(-max_total_time="$per_target" -rss_limit_mb=2048 -timeout=25 -max_len=16384
        -print_final_stats=1)
    [[ -f $target.dict ]] && options+=(-dict="$target.dict")
    log=$(mktemp)
    echo "==> fuzzing $target for ${per_target}s" >&2
    if cargo fuzz run --target-dir "$target_dir" "$target" "${inputs[@]}" -- "${options[@]}" \
        >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
        tail -n 60 "$log" >&2
    fi
    # libFuzzer's own count: "Done N runs in S second(s)", or, when it
    # stopped at a finding, the last "#N" status line.
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -n1 | grep -oE '[0-9]+' || true)
    if [[ -z $runs ]]; then
        runs=$(grep -oE '^#[0-9]+' "$log" | tail -n1 | tr -d '#' || true)
    fi
    line=$(printf '%-22s %-7s %12s runs  corpus %6s inputs' "$target" "$status" "${runs:-?}" \
        "$(find "$corpus" -type f | wc -l)")
    if [[ $status == FAILED ]]; then
        artifact=$(grep -oE 'artifacts/[^ ]+' "$log" | tail -n1 || true)
        line+="  ${artifact:+fuzz/$artifact}"
    fi
    echo "    $line" >&2
    summary+=("$line")
    rm -f "$log"
done

echo "==> fuzz summary (${per_target}s per target)" >&2
printf '    %s\n' "${summary[@]}" >&2
if ((${#failed[@]})); then
    echo "==> fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "==> fuzzing passed" >&2
