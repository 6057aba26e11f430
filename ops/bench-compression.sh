#!/usr/bin/env bash
# The compression curve (issue 14): for the push benchmark's two NARs (this
# machine's Rust 1.95 and nightly toolchains' `lib/`), the bytes Larder
# stores at each zstd level (every distinct FastCDC chunk of both, one zstd
# frame each, as the pipeline cuts and compresses them) beside the two NARs
# compressed whole with `zstd -8 -T1` (the push benchmark's reference), and
# the speed of one core compressing them at that level (its CPU time, so
# other load does not skew it) beside `zstd -3 -T1` on NAR A. Not a test:
# it reports the curve from which `[pipeline] compression-level`'s default
# is picked.
#
#   ops/bench-compression.sh [--levels 1,2,3,...] [--large-a DIR] [--large-b DIR]
#                            [--out FILE] [--no-build] [--keep]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-compression
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

toolchains=$HOME/.rustup/toolchains
large_a=$(ls -d "$toolchains"/1.95*/lib 2>/dev/null | head -n 1 || true)
large_b=$(ls -d "$toolchains"/nightly*/lib 2>/dev/null | head -n 1 || true)
levels=1,2,3,4,5,6,7,8,9,12,15,19
out=
build=1
keep=0
while (($#)); do
    case $1 in
        --levels) levels=${2:?}; shift 2 ;;
        --large-a) large_a=${2:?}; shift 2 ;;
        --large-b) large_b=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        *) usage ;;
    esac
done
[[ $levels =~ ^-?[0-9]+(,-?[0-9]+)*$ ]] || die "--levels takes comma-separated whole numbers, got '$levels'"
for dir in "$large_a" "$large_b"; do
    [[ -d $dir ]] || die "'$dir' is not a directory (see --large-a, --large-b)"
done
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
out=${out:-$repo/ops/bench-results/compression-$(date -u +%Y%m%d-%H%M%S).txt}

install_tools zstd:zstd
command -v nix-store >/dev/null || bash "$repo/ops/install.sh"
release_binaries tests -- bench_compression
start_work_dir

say "dumping the NARs of $large_a and $large_b"
nix-store --dump "$large_a" >"$work/a.nar"
nix-store --dump "$large_b" >"$work/b.nar"
size_a=$(stat -c %s "$work/a.nar")
size_b=$(stat -c %s "$work/b.nar")

say "compressing both NARs whole with zstd -8 -T1, and NAR A with zstd -3 -T1"
zstd8=$(($(zstd -q -8 -T1 -c "$work/a.nar" | wc -c) + $(zstd -q -8 -T1 -c "$work/b.nar" | wc -c)))
# zstd's own CPU time (user + system), for the same footing as the curve's.
zstd3_cpu=$( { TIMEFORMAT='%U %S'; time zstd -q -3 -T1 -c "$work/a.nar" >/dev/null; } 2>&1 | awk '{ print $1 + $2 }')

say "compressing every distinct chunk at levels $levels"
"$bin/bench_compression" "$levels" "$work/a.nar" "$work/b.nar" >"$work/curve.vars"
declare -A result
while IFS='=' read -r key value; do
    result[$key]=$value
done <"$work/curve.vars"

mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
report=$work/report.txt
{
    echo "Larder compression curve, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo); load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "NAR A: $large_a, $(mib_of "$size_a") MiB; NAR B: $large_b, $(mib_of "$size_b") MiB"
    echo "distinct chunks of A + B: $(mib_of "${result[UNIQUE_BYTES]}") MiB; zstd -8 -T1 of A + B whole: $(mib_of "$zstd8") MiB"
    echo "zstd -3 -T1 on NAR A: $(mibps "$size_a" "$zstd3_cpu") MiB/s of CPU time"
    echo
    printf '%6s %14s %14s %18s\n' level "stored MiB" "vs zstd -8" "MiB/s per core"
    IFS=, read -ra list <<<"$levels"
    for level in "${list[@]}"; do
        bytes=${result[LEVEL_${level}_BYTES]}
        seconds=${result[LEVEL_${level}_SECONDS]}
        printf '%6s %14s %14s %18s\n' "$level" "$(mib_of "$bytes")" "$(ratio "$bytes" "$zstd8")" \
            "$(mibps "${result[UNIQUE_BYTES]}" "$seconds")"
    done
} >"$report"
mkdir -p "$(dirname "$out")"
cp "$report" "$out"
echo
cat "$report"
