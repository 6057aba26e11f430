#!/usr/bin/env bash
# The push benchmark (issue 4): Larder's one-machine `ingest-api` (release
# build, SQLite, local storage, the pipeline in-process) ingesting real
# data, beside this machine's own limits measured in the same run on the
# same bytes. Not a test: it reports figures and ratios, it asserts no
# timing.
#
#   ops/bench-push.sh [--large-a DIR] [--large-b DIR] [--small N] [--jobs N]
#                     [--small-source DIR] [--out FILE] [--no-build] [--keep]
#
# What it measures:
#   1. One new large NAR (default: the NAR of this machine's Rust 1.95
#      toolchain `lib/`, ~500 MiB) pushed through Attic's `upload-path`,
#      from request start until the path is visible: MiB/s of NAR, beside
#      single-threaded `sha256sum` and `zstd -3 -T1` on the same NAR file.
#      Target: >= 0.8x zstd -3 (issue 14). The time each stage of the
#      pipeline took during that push (larder_push_stage_seconds, read from
#      /metrics before and after) is reported beside it, so that a
#      regression shows where it happened.
#   2. A second version of that directory (default: the nightly toolchain's
#      `lib/`) pushed the same way; then the bytes stored for both (every
#      chunk object) beside the two NARs compressed whole with
#      `zstd -8 -T1`. Target: <= 1.10x (issue 14).
#   3. N small paths (default 300; NARs of 10-500 KiB of real file contents
#      from --small-source, default /usr/lib/python3.11), from the first
#      request until the last path is visible, three ways, each into a fresh
#      cache with NARs no other run pushed (ops/bench/small-paths.sh):
#      bench_push's pusher with --jobs requests in flight (default 8),
#      `larder push -j JOBS` and `nix copy --to` (zstd) of N store paths
#      added to a chroot Nix store. Targets: >= 500 paths/s, nix copy >= 250.
#      The server's time per request of each route during each of the
#      three is reported too.
#   4. The door alone: a NAR holding NAR A's bytes as one file (so it is
#      new to the server) pushed with `X-Larder-Wait: 0`, from request
#      start until it is verified and spooled: MiB/s, beside single-threaded
#      `openssl dgst -sha256` (issue 14 wants >= 0.5x).
#   4b. NAR A pushed again, into a second cache, until visible: the NAR is
#      stored already, so this is proof of possession (the body is read,
#      hashed, verified and spooled, and the chunker links the stored NAR):
#      MiB/s beside `openssl dgst -sha256` (issue 14 wants >= 0.5x).
#   5. The server's peak resident memory (VmHWM) over the whole run.
#      Target: <= 128 MiB.
#
# The server waits for visibility before it answers (ingest.wait-for-visible
# is raised to 10 minutes here); `bench_push` (tests/src/bin/bench_push.rs)
# polls the upload's status should an answer come earlier, so each figure
# spans "request start until visible". The result table goes to stdout and
# to --out (default ops/bench-results/push-<UTC date>.txt).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-push
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

toolchains=$HOME/.rustup/toolchains
large_a=$(ls -d "$toolchains"/1.95*/lib 2>/dev/null | head -n 1 || true)
large_b=$(ls -d "$toolchains"/nightly*/lib 2>/dev/null | head -n 1 || true)
small=300
jobs=8
small_source=/usr/lib/python3.11
out=
build=1
keep=0

while (($#)); do
    case $1 in
        --large-a) large_a=${2:?}; shift 2 ;;
        --large-b) large_b=${2:?}; shift 2 ;;
        --small) small=${2:?}; shift 2 ;;
        --jobs) jobs=${2:?}; shift 2 ;;
        --small-source) small_source=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) usage ;;
    esac
done
for number in "$small" "$jobs"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$number'"
done
for dir in "$large_a" "$large_b" "$small_source"; do
    [[ -d $dir ]] || die "'$dir' is not a directory (see --large-a, --large-b, --small-source)"
done
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ -z $out ]]; then
    out=$repo/ops/bench-results/push-$(date -u +%Y%m%d-%H%M%S).txt
fi

install_tools curl:curl zstd:zstd openssl:openssl
command -v nix-store >/dev/null || bash "$repo/ops/install.sh"

release_binaries ingest-api tests watcher-agent -- ingest-api bench_push larder

server_pid=
start_work_dir server_pid

# --- the bytes, and this machine's limits on them -----------------------------

say "dumping the NARs of $large_a and $large_b"
nix-store --dump "$large_a" >"$work/a.nar"
nix-store --dump "$large_b" >"$work/b.nar"
size_a=$(stat -c %s "$work/a.nar")
size_b=$(stat -c %s "$work/b.nar")

# Seconds (wall clock) that the command takes, its output discarded.
seconds_of() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

say "measuring sha256sum, openssl dgst -sha256 and zstd -3 -T1 on the first NAR"
cat "$work/a.nar" >/dev/null # the page cache, for both alike
sha_seconds=$(seconds_of sha256sum "$work/a.nar")
openssl_seconds=$(seconds_of openssl dgst -sha256 "$work/a.nar")
zstd3_seconds=$(seconds_of zstd -q -3 -T1 -c "$work/a.nar")
say "compressing both NARs whole with zstd -8 -T1"
zstd8_a=$(zstd -q -8 -T1 -c "$work/a.nar" | wc -c)
zstd8_b=$(zstd -q -8 -T1 -c "$work/b.nar" | wc -c)

# --- Larder: config, token, caches, server -------------------------------------

server_dir=$work/server
mkdir -p "$server_dir"
config=$server_dir/server.toml
"$bin/ingest-api" --config "$config" --mode migrate >/dev/null
storage=$server_dir/storage
token=$("$bin/ingest-api" make-token --config "$config" --sub bench-push --validity 1d \
    --pull 'bench-*' --push 'bench-*' --create-cache 'bench-*' | tail -n 1)
auth="Authorization: Bearer $token"

pick_port larder_port
LARDER_INGEST__WAIT_FOR_VISIBLE="10 minutes" RUST_LOG=warn \
    "$bin/ingest-api" --config "$config" --listen "$HOST:$larder_port" >"$work/server.log" 2>&1 &
server_pid=$!
larder=http://$HOST:$larder_port
wait_http "$larder/" "$server_pid" "$work/server.log"
say "ingest-api (pid $server_pid) serves $larder"

for cache in bench-large bench-small bench-door bench-again; do
    code=$(curl -s -o "$work/create.json" -w '%{http_code}' -X POST -H "$auth" \
        -H 'Content-Type: application/json' -d '{"keypair": "Generate", "is_public": false}' \
        "$larder/_api/v1/cache-config/$cache")
    [[ $code == 200 || $code == 201 ]] || die "creating $cache answered $code: $(cat "$work/create.json")"
done

# Bytes of chunk data in storage: packs (and one-chunk objects, had a
# store from before packs been given). Either directory may not exist.
stored_bytes() {
    local dirs=() dir
    for dir in "$storage/packs" "$storage/chunks"; do
        [[ -d $dir ]] && dirs+=("$dir")
    done
    ((${#dirs[@]})) || { echo 0; return; }
    find "${dirs[@]}" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'
}

# --- the pushes --------------------------------------------------------------

# The seconds spent in each push stage so far, as `stage seconds` lines.
stage_seconds() {
    curl -sf "$larder/metrics" |
        sed -n 's/^larder_push_stage_seconds_sum{stage="\([a-z_]*\)"} \(.*\)$/\1 \2/p'
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
push=("$bin/bench_push" --url "$larder" --token "$token")
say "pushing the two large NARs"
stage_seconds >"$work/stages-before"
"${push[@]}" --cache bench-large large "$work/a.nar" >"$work/large-a.vars"
stage_seconds >"$work/stages-after-a"
"${push[@]}" --cache bench-large large "$work/b.nar" | sed 's/^LARGE_SECONDS_0=/LARGE_SECONDS_1=/' >"$work/large-b.vars"
cat "$work/large-a.vars" "$work/large-b.vars" >"$work/large.vars"
stored_after_a_and_b=$(stored_bytes)
# shellcheck source=ops/bench/small-paths.sh
source "$repo/ops/bench/small-paths.sh"
bench_small_paths "$work/small.vars" "$work/small-routes.txt"
# Before the door push, whose new NAR the pipeline goes on storing after
# its answer.
say "pushing NAR A again, into a second cache (proof of possession)"
"${push[@]}" --cache bench-again large "$work/a.nar" >"$work/again.vars"
again_seconds=$(sed -n 's/^LARGE_SECONDS_0=//p' "$work/again.vars")
[[ -n $again_seconds ]] || die "bench_push printed no LARGE_SECONDS_0 for the second cache"
say "pushing a NAR of NAR A's bytes through the door alone (X-Larder-Wait: 0)"
"${push[@]}" --cache bench-door door "$work/a.nar" >"$work/door.vars"
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
rss=$(peak_rss_kib "$server_pid")
kill -0 "$server_pid" 2>/dev/null || die "the server exited during the run: $(tail -n 20 "$work/server.log")"

declare -A result
while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Z0-9_]+$ ]] && result[$key]=$value
done < <(cat "$work/large.vars" "$work/small.vars" "$work/door.vars")
for key in LARGE_SECONDS_0 LARGE_SECONDS_1 SMALL_SECONDS SMALL_BYTES LARDER_PUSH_SECONDS \
    NIX_COPY_SECONDS STORE_PATH_BYTES DOOR_SECONDS DOOR_BYTES; do
    [[ -n ${result[$key]:-} ]] || die "bench_push printed no $key"
done

# --- report ------------------------------------------------------------------

sha_mibps=$(mibps "$size_a" "$sha_seconds")
openssl_mibps=$(mibps "$size_a" "$openssl_seconds")
door_mibps=$(mibps "${result[DOOR_BYTES]}" "${result[DOOR_SECONDS]}")
r_door=$(ratio "$door_mibps" "$openssl_mibps")
again_mibps=$(mibps "$size_a" "$again_seconds")
r_again=$(ratio "$again_mibps" "$openssl_mibps")
zstd3_mibps=$(mibps "$size_a" "$zstd3_seconds")
push_a_mibps=$(mibps "$size_a" "${result[LARGE_SECONDS_0]}")
push_b_mibps=$(mibps "$size_b" "${result[LARGE_SECONDS_1]}")
per_second() { awk -v n="$small" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }
small_rate=$(per_second "${result[SMALL_SECONDS]}")
larder_push_rate=$(per_second "${result[LARDER_PUSH_SECONDS]}")
nix_copy_rate=$(per_second "${result[NIX_COPY_SECONDS]}")
r_push=$(ratio "$push_a_mibps" "$zstd3_mibps")
r_store=$(ratio "$stored_after_a_and_b" "$((zstd8_a + zstd8_b))")
at_most() { awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t ? "met" : "MISSED") }'; }
mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

report=$work/report.txt
{
    echo "Larder push benchmark, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "larder: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD 2>/dev/null || echo '+changes'), release build, one machine (SQLite, local storage, in-process pipeline)"
    echo "NAR A: $large_a, $(mib_of "$size_a") MiB; NAR B: $large_b, $(mib_of "$size_b") MiB"
    echo "small paths: $small NARs of 10-500 KiB from $small_source, $(mib_of "${result[SMALL_BYTES]}") MiB in all, $jobs in flight;" \
        "store paths for larder push and nix copy: $small each, $(mib_of "${result[STORE_PATH_BYTES]}") MiB of NAR per set"
    echo "load average (1, 5, 15 min) before the pushes: $load_before; after: $load_after"
    echo
    printf '%-44s %12s %10s %8s  %s\n' "" figure ratio target ""
    printf '%-44s %12s\n' "sha256sum, 1 thread, MiB/s (NAR A)" "$sha_mibps"
    printf '%-44s %12s\n' "zstd -3 -T1, MiB/s (NAR A)" "$zstd3_mibps"
    printf '%-44s %12s %10s %8s  %s\n' "push NAR A until visible, MiB/s" "$push_a_mibps" "$r_push" ">= 0.8" \
        "$(verdict "$r_push" 0.8) (ratio to zstd -3)"
    printf '%-44s %12s\n' "push NAR B until visible, MiB/s" "$push_b_mibps"
    printf '%-44s %12s\n' "openssl dgst -sha256, MiB/s (NAR A)" "$openssl_mibps"
    printf '%-44s %12s %10s %8s  %s\n' "door alone (X-Larder-Wait: 0), MiB/s" "$door_mibps" "$r_door" ">= 0.5" \
        "$(verdict "$r_door" 0.5) (ratio to openssl; issue 14)"
    printf '%-44s %12s %10s %8s  %s\n' "NAR A into a 2nd cache until visible, MiB/s" "$again_mibps" "$r_again" ">= 0.5" \
        "$(verdict "$r_again" 0.5) (proof of possession; ratio to openssl)"
    printf '%-44s %12s\n' "zstd -8 -T1 of A + B whole, MiB" "$(mib_of $((zstd8_a + zstd8_b)))"
    printf '%-44s %12s %10s %8s  %s\n' "stored for A + B (chunk objects), MiB" "$(mib_of "$stored_after_a_and_b")" \
        "$r_store" "<= 1.10" "$(at_most "$r_store" 1.10) (ratio to zstd -8 whole)"
    printf '%-44s %12s %10s %8s  %s\n' "small paths visible per second" "$small_rate" "" ">= 500" \
        "$(verdict "$small_rate" 500)"
    printf '%-44s %12s %10s %8s  %s\n' "  larder push -j $jobs, paths per second" "$larder_push_rate" "" ">= 500" \
        "$(verdict "$larder_push_rate" 500)"
    printf '%-44s %12s %10s %8s  %s\n' "  nix copy --to (zstd), paths per second" "$nix_copy_rate" "" ">= 250" \
        "$(verdict "$nix_copy_rate" 250)"
    printf '%-44s %12s %10s %8s  %s\n' "server peak RSS MiB (VmHWM), whole run" "$(mib "$rss")" "" "<= 128" \
        "$(at_most "$(mib "$rss")" 128)"
    echo
    echo "time in each stage while NAR A was pushed (${result[LARGE_SECONDS_0]} s of wall time; stages"
    echo "overlap, so their seconds add up to more):"
    # Both list the stages in the order the server renders them.
    paste -d' ' "$work/stages-before" "$work/stages-after-a" |
        awk '{ printf "  %-16s %8.2f s\n", $1, $4 - $2 }'
    echo
    echo "the server's time per request, by route, during each small-path push (from a"
    echo "request's arrival to its answer's last byte; a push waits for visibility):"
    cat "$work/small-routes.txt"
} >"$report"

mkdir -p "$(dirname "$out")"
cp "$report" "$out"
echo
cat "$report"
echo
