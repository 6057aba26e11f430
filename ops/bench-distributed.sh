#!/usr/bin/env bash
# The distributed push benchmark (issue 5): one large NAR pushed through
# Attic's `upload-path` until visible, by the one-machine `ingest-api`
# (SQLite, local storage, in-process pipeline) and by the distributed
# topology of ops/cluster.sh (2 × ingest-api --mode api, 2 chunkers,
# gc-scheduler, on PostgreSQL, RabbitMQ and Garage from ops/services.sh)
# with 1 and then 2 compressors; each process's peak resident memory.
# Release builds. Not a test: it reports figures and ratios, it asserts no
# timing.
#
#   ops/bench-distributed.sh [--nar-source DIR] [--out FILE] [--no-build] [--keep]
#
# Figures: push MiB/s of NAR until visible for each topology; the
# distributed push beside the one-machine one (target >= 0.7x); 2
# compressors beside 1; peak RSS (VmHWM) of every process (target <= 128
# MiB each); the CPU seconds each command on the machine used during each
# push (the services' share included: they run on the same cores). The NAR (default: this machine's Rust 1.95 toolchain `lib/`,
# as ops/bench-push.sh uses) is pushed into a fresh database each time, so
# nothing is deduplicated. `bench_push` (tests/src/bin/bench_push.rs)
# does the pushing. The table goes to stdout and to --out (default
# ops/bench-results/distributed-<UTC date>.txt).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-distributed
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

nar_source=$(ls -d "$HOME"/.rustup/toolchains/1.95*/lib 2>/dev/null | head -n 1 || true)
out=
build=1
keep=0
while (($#)); do
    case $1 in
        --nar-source) nar_source=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        *) usage ;;
    esac
done
[[ -d $nar_source ]] || die "'$nar_source' is not a directory (see --nar-source)"
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
out=${out:-$repo/ops/bench-results/distributed-$(date -u +%Y%m%d-%H%M%S).txt}

install_tools curl:curl
command -v nix-store >/dev/null || bash "$repo/ops/install.sh"

release_binaries ingest-api chunker-worker compressor-worker gc-scheduler tests -- \
    ingest-api chunker-worker compressor-worker gc-scheduler bench_push

server_pid=
clusters=()
before_cleanup() {
    local cluster
    for cluster in "${clusters[@]}"; do
        [[ -f $cluster/pids ]] && bash "$repo/ops/cluster.sh" stop "$cluster" || true
    done
    [[ -f $work/services/vars ]] && bash "$repo/ops/services.sh" stop "$work/services" || true
}
start_work_dir server_pid
# The services' users (postgres, rabbitmq) must reach $work/services.
chmod 711 "$work"

say "dumping the NAR of $nar_source"
nix-store --dump "$nar_source" >"$work/large.nar"
size=$(stat -c %s "$work/large.nar")

# Creates cache `bench` on the server at $1 with token $2.
create_cache() {
    local code
    code=$(curl -s -o "$work/create.json" -w '%{http_code}' -X POST -H "Authorization: Bearer $2" \
        -H 'Content-Type: application/json' -d '{"keypair": "Generate", "is_public": false}' \
        "$1/_api/v1/cache-config/bench")
    [[ $code == 200 || $code == 201 ]] || die "creating the cache answered $code: $(cat "$work/create.json")"
}

# Pushes the NAR to the server at $1 with token $2; prints the seconds
# until it was visible.
push_seconds() {
    "$bin/bench_push" --url "$1" --token "$2" --cache bench large "$work/large.nar" >"$work/push.vars"
    sed -n 's/^LARGE_SECONDS_0=//p' "$work/push.vars"
}

# --- one machine ---------------------------------------------------------------

say "one machine: ingest-api with SQLite, local storage and its pipeline in-process"
config=$work/one-machine/server.toml
mkdir -p "$work/one-machine"
"$bin/ingest-api" --config "$config" --mode migrate >/dev/null
token=$("$bin/ingest-api" make-token --config "$config" --sub bench --validity 1d \
    --pull bench --push bench --create-cache bench | tail -n 1)
pick_port server_port
LARDER_INGEST__WAIT_FOR_VISIBLE="10 minutes" RUST_LOG=warn \
    "$bin/ingest-api" --config "$config" --listen "$HOST:$server_port" >"$work/one-machine.log" 2>&1 &
server_pid=$!
wait_http "http://$HOST:$server_port/" "$server_pid" "$work/one-machine.log"
create_cache "http://$HOST:$server_port" "$token"
one_seconds=$(push_seconds "http://$HOST:$server_port" "$token")
one_rss=$(peak_rss_kib "$server_pid")
stop_pid "$server_pid"
server_pid=

# --- distributed -----------------------------------------------------------------

bash "$repo/ops/services.sh" start "$work/services"
declare -A seconds rss_lines cpu_lines
for compressors in 1 2; do
    cluster=$work/cluster-$compressors
    clusters+=("$cluster")
    say "distributed, $compressors compressor(s)"
    bash "$repo/ops/cluster.sh" start "$cluster" --services "$work/services" \
        --compressors "$compressors" --bin-dir "$bin" -- \
        "LARDER_INGEST__WAIT_FOR_VISIBLE=10 minutes"
    # shellcheck source=/dev/null
    source "$cluster/env"
    token=$("$bin/ingest-api" make-token --config "$LARDER_CONFIG" --sub bench --validity 1d \
        --pull bench --push bench --create-cache bench | tail -n 1)
    api=${LARDER_CLUSTER_API_URLS%% *}
    create_cache "$api" "$token"
    cpu_ticks_by_process >"$work/cpu-before"
    seconds[$compressors]=$(push_seconds "$api" "$token")
    cpu_ticks_by_process >"$work/cpu-after"
    cpu_lines[$compressors]=$(cpu_seconds_between "$work/cpu-before" "$work/cpu-after" |
        awk '{ printf "  %-42s %12s\n", $1 " CPU seconds", $2 }')
    lines=
    for entry in $LARDER_CLUSTER_PIDS; do
        lines+="$(printf '  %-42s %12s' "${entry%=*} peak RSS MiB" "$(mib "$(peak_rss_kib "${entry#*=}")")")"$'\n'
    done
    rss_lines[$compressors]=$lines
    bash "$repo/ops/cluster.sh" stop "$cluster"
done

# --- report ----------------------------------------------------------------------

one_mibps=$(mibps "$size" "$one_seconds")
d1_mibps=$(mibps "$size" "${seconds[1]}")
d2_mibps=$(mibps "$size" "${seconds[2]}")
r_dist=$(ratio "$d2_mibps" "$one_mibps")
r_scale=$(ratio "$d2_mibps" "$d1_mibps")
max_rss=$(printf '%s' "${rss_lines[1]}${rss_lines[2]}" | awk '{ if ($NF > m) m = $NF } END { print m + 0 }')
report=$work/report.txt
{
    echo "Larder distributed push benchmark, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), load average now $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "larder: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD 2>/dev/null || echo '+changes'), release build"
    echo "NAR: $nar_source, $(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1048576 }') MiB, pushed through Attic's upload-path until visible"
    echo
    printf '%-44s %12s %10s %8s  %s\n' "" figure ratio target ""
    printf '%-44s %12s %10s %8s  %s\n' "one machine, MiB/s" "$one_mibps" "" "" ""
    printf '%-44s %12s %10s %8s  %s\n' "distributed, 1 compressor, MiB/s" "$d1_mibps" "" "" ""
    printf '%-44s %12s %10s %8s  %s\n' "distributed, 2 compressors, MiB/s" "$d2_mibps" "$r_dist" ">= 0.7" \
        "$(verdict "$r_dist" 0.7) (ratio to one machine)"
    printf '%-44s %12s %10s %8s  %s\n' "2 compressors / 1 compressor" "" "$r_scale" "" ""
    printf '%-44s %12s\n' "one-machine server peak RSS MiB" "$(mib "$one_rss")"
    for compressors in 1 2; do
        echo "distributed, $compressors compressor(s):"
        printf '%s' "${rss_lines[$compressors]}"
        echo "  CPU seconds during the push, by command (every process on the machine):"
        printf '%s\n' "${cpu_lines[$compressors]}"
    done
    printf '%-44s %12s %10s %8s  %s\n' "largest distributed peak RSS MiB" "$max_rss" "" "<= 128" \
        "$(awk -v r="$max_rss" 'BEGIN { print (r <= 128 ? "met" : "MISSED") }')"
} >"$report"
mkdir -p "$(dirname "$out")"
cp "$report" "$out"
echo
cat "$report"
echo
