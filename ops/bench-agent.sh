#!/usr/bin/env bash
# The client benchmark (issue 6): the `larder` CLI and the `watcher-agent`
# (release builds) against Larder's one-machine `ingest-api` (release,
# SQLite, local storage), with a throwaway chroot Nix store. Not a test: it
# reports figures, it asserts no timing.
#
#   ops/bench-agent.sh [--calls N] [--large-gib N] [--out FILE] [--no-build] [--keep]
#
# What it measures:
#   1. The post-build-hook's cost: N calls (default 100) of
#      `larder queue CACHE PATH`, each with another store path, while the
#      watcher-agent runs and uploads what the earlier calls queued; the
#      wall time of each call, median and 95th percentile.
#      Target: under 50 ms.
#   2. Memory: `larder push` of one new store path holding N GiB (default 2)
#      of incompressible data; the client's peak resident memory (VmHWM of
#      `larder`, and of the `nix store dump-path` it streams from, sampled
#      every 0.1 s) beside the NAR's size, and the push's wall time until
#      the server acknowledged the upload (--no-wait).
#      Target: `larder` under 100 MiB.
#
# The result table goes to stdout and to --out (default
# ops/bench-results/agent-<UTC date>.txt). Needs about 3x the large size in
# free space under /tmp (the store copy, the server's staging and chunks).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-agent
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

calls=100
large_gib=2
out=
build=1
keep=0
while (($#)); do
    case $1 in
        --calls) calls=${2:?}; shift 2 ;;
        --large-gib) large_gib=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        *) usage ;;
    esac
done
for number in "$calls" "$large_gib"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$number'"
done
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ -z $out ]]; then
    out=$repo/ops/bench-results/agent-$(date -u +%Y%m%d-%H%M%S).txt
fi

install_tools curl:curl
command -v nix-store >/dev/null || bash "$repo/ops/install.sh"

release_binaries ingest-api watcher-agent -- ingest-api larder watcher-agent

server_pid=
agent_pid=
start_work_dir agent_pid server_pid

# --- the server ------------------------------------------------------------------

server_dir=$work/server
mkdir -p "$server_dir"
config=$server_dir/server.toml
"$bin/ingest-api" --config "$config" --mode migrate >/dev/null
token=$("$bin/ingest-api" make-token --config "$config" --sub bench-agent --validity 1d \
    --pull 'bench-*' --push 'bench-*' --create-cache 'bench-*' | tail -n 1)
larder_port=
pick_port larder_port
RUST_LOG=warn "$bin/ingest-api" --config "$config" --listen "$HOST:$larder_port" \
    >"$work/server.log" 2>&1 &
server_pid=$!
larder_url=http://$HOST:$larder_port
wait_http "$larder_url/" "$server_pid" "$work/server.log"
say "ingest-api (pid $server_pid) serves $larder_url"

# --- the client: its own home, config and chroot store -------------------------------

store=$work/store
mkdir -p "$work/home" "$work/nix-conf"
export HOME=$work/home XDG_CONFIG_HOME=$work/home/.config XDG_STATE_HOME=$work/home/.local/state
export XDG_CACHE_HOME=$work/home/.cache NIX_CONF_DIR=$work/nix-conf
export NIX_CONFIG="experimental-features = nix-command
store = $store
substituters =
fsync-metadata = false"
unset NIX_REMOTE
"$bin/larder" login bench "$larder_url" "$token" >/dev/null
"$bin/larder" cache create bench-queue >/dev/null
"$bin/larder" cache create bench-large >/dev/null

# --- 1. hook-call latency ----------------------------------------------------------

say "adding $calls small store paths"
sources=()
for ((i = 0; i < calls; i++)); do
    mkdir -p "$work/sources/s$i"
    printf 'bench-agent %s %d\n' "$started_at" "$i" >"$work/sources/s$i/data"
    sources+=("$work/sources/s$i")
done
mapfile -t paths < <(nix-store --add "${sources[@]}")
((${#paths[@]} == calls)) || die "nix-store --add printed ${#paths[@]} paths, expected $calls"

RUST_LOG=warn "$bin/watcher-agent" >"$work/agent.log" 2>&1 &
agent_pid=$!
waited=0
until "$bin/larder" queue status >/dev/null 2>&1; do
    kill -0 "$agent_pid" 2>/dev/null || die "watcher-agent exited: $(tail -n 5 "$work/agent.log")"
    ((waited < 300)) || die "watcher-agent did not answer within 30 s"
    sleep 0.1
    waited=$((waited + 1))
done

say "timing $calls calls of larder queue while the agent uploads"
latencies=()
drain_start=$(date +%s%N)
for path in "${paths[@]}"; do
    start=$(date +%s%N)
    "$bin/larder" queue bench-queue "$path" >/dev/null 2>"$work/queue.err" ||
        die "larder queue failed: $(cat "$work/queue.err")"
    end=$(date +%s%N)
    latencies+=("$(awk -v ns=$((end - start)) 'BEGIN { printf "%.2f", ns / 1e6 }')")
done
median_ms=$(printf '%s\n' "${latencies[@]}" | median)
p95_ms=$(printf '%s\n' "${latencies[@]}" | sort -g |
    awk '{ v[NR] = $1 } END { i = int(NR * 0.95 + 0.999); if (i < 1) i = 1; print v[i] }')
max_ms=$(printf '%s\n' "${latencies[@]}" | sort -g | tail -n 1)

say "waiting for the agent to upload all $calls paths"
waited=0
until "$bin/larder" queue status | grep -q '^pending: 0$' &&
    "$bin/larder" queue status | grep -q '^in flight: 0$'; do
    ((waited < 3000)) || die "the queue did not drain within 300 s: $("$bin/larder" queue status)"
    sleep 0.1
    waited=$((waited + 1))
done
drain_seconds=$(awk -v ns=$(($(date +%s%N) - drain_start)) 'BEGIN { printf "%.1f", ns / 1e9 }')
failed=$("$bin/larder" queue status | awk '/^failed:/ { print $2 }')
stop_pid "$agent_pid"
agent_pid=

# --- 2. memory of a large push -------------------------------------------------

say "writing $large_gib GiB of random data and adding it to the store"
mkdir -p "$work/large"
head -c $((large_gib << 30)) /dev/urandom >"$work/large/blob"
large_path=$(nix-store --add "$work/large")
rm -rf "$work/large"
nar_size=$(nix path-info --json "$large_path" | sed 's/.*"narSize":\([0-9]*\).*/\1/')

say "pushing $large_path ($(mib $((nar_size / 1024))) MiB NAR)"
push_start=$(date +%s%N)
"$bin/larder" push --no-wait bench-large "$large_path" >"$work/push.out" 2>"$work/push.err" &
push_pid=$!
larder_peak=0
nix_peak=0
while kill -0 "$push_pid" 2>/dev/null; do
    value=$(peak_rss_kib "$push_pid")
    ((value > larder_peak)) && larder_peak=$value
    for child in $(pgrep -P "$push_pid" || true); do
        value=$(peak_rss_kib "$child")
        ((value > nix_peak)) && nix_peak=$value
    done
    sleep 0.1
done
wait "$push_pid" || die "larder push failed: $(tail -n 3 "$work/push.err")"
push_seconds=$(awk -v ns=$(($(date +%s%N) - push_start)) 'BEGIN { printf "%.1f", ns / 1e9 }')

# --- report -----------------------------------------------------------------------

mkdir -p "$(dirname "$out")"
{
    printf 'bench-agent, %s, %s, %s\n' "$started_at" "$(uname -m)" "$(nix --version)"
    printf '%-52s %12s %8s  %s\n' "measure" "value" "target" "verdict"
    printf '%-52s %12s %8s  %s\n' "larder queue, median ms ($calls calls, agent busy)" "$median_ms" "< 50" \
        "$(awk -v v="$median_ms" 'BEGIN { print (v < 50 ? "met" : "MISSED") }')"
    printf '%-52s %12s %8s  %s\n' "larder queue, p95 ms" "$p95_ms" "< 50" \
        "$(awk -v v="$p95_ms" 'BEGIN { print (v < 50 ? "met" : "MISSED") }')"
    printf '%-52s %12s\n' "larder queue, slowest ms" "$max_ms"
    printf '%-52s %12s\n' "agent: all $calls queued paths uploaded, s" "$drain_seconds"
    printf '%-52s %12s\n' "agent: paths failed" "$failed"
    printf '%-52s %12s\n' "large push: NAR size MiB" "$(mib $((nar_size / 1024)))"
    printf '%-52s %12s\n' "large push: until acknowledged (--no-wait), s" "$push_seconds"
    printf '%-52s %12s %8s  %s\n' "large push: larder peak RSS MiB (VmHWM)" "$(mib "$larder_peak")" "< 100" \
        "$(awk -v v="$larder_peak" 'BEGIN { print (v < 100 * 1024 ? "met" : "MISSED") }')"
    printf '%-52s %12s\n' "large push: nix store dump-path peak RSS MiB" "$(mib "$nix_peak")"
} | tee "$out"
say "results in $out"
