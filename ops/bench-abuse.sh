#!/usr/bin/env bash
# The abuse benchmark (issue 12): what one hostile tenant with a push token
# for its own cache does to Larder's one-machine `ingest-api` (release build,
# SQLite, local storage, the pipeline in-process), and what another tenant
# sees meanwhile. Not a test: it reports figures, it asserts no timing, and
# an attack that is refused (any status, a closed connection) is a result
# to count, never a failure of the script.
#
#   ops/bench-abuse.sh [--seconds N] [--bomb-mib N] [--stalled N] [--uploads N]
#                      [--out FILE] [--no-build] [--keep]
#
# Scenarios, one after the other against the same server (each attack runs
# a second before and then during --seconds, default 20, of the victim's
# requests):
#   none          no attack: the baseline;
#   zstd-bomb     PUT nar/<FileHash>.nar.zst: a NAR of --bomb-mib (1024) MiB
#                 of zeros, zstd-compressed, two at a time, over and over;
#   xz-bomb       the same as .nar.xz;
#   ls-loop       GET <hash>.ls of the hostile tenant's own NAR of zeros
#                 (--bomb-mib MiB), four at a time;
#   nar-repeated  GET of that NAR (thousands of chunk entries, all the same
#                 chunk), four at a time;
#   uploads       --uploads (64) concurrent upload-paths of fresh 1 MiB NARs;
#   stalled       --stalled (600) uploads that send headers and 64 bytes,
#                 then nothing, held open (last, since without defences they
#                 can leave the server unable to serve at all).
# For each: the p50/p99 latency of the victim tenant's narinfo and NAR
# (4 MiB) requests, each sent one at a time with a 15 s timeout (failures
# counted, and in the percentiles at the time they took); the server's peak
# RSS (VmHWM, reset before each scenario); for the hostile tenant, the
# bytes the server wrote (/proc/PID/io write_bytes: staging, chunk objects,
# database) per request body byte it sent, the storage directory's growth
# at its peak and at the end, and how its requests were answered.
#
# How: a fresh directory under /tmp holds everything. `ingest-api --mode
# migrate` writes a first-start config (SQLite, storage directory); two
# tokens are minted, one per tenant; the server starts on 127.0.0.1 on a
# free port picked at random; `bench_abuse` (tests/src/bin/bench_abuse.rs)
# pushes the two tenants' paths and runs the scenarios. The server is
# stopped on the way out, by pid, also on failure or Ctrl-C. Builds the two
# binaries in release mode unless --no-build. Run it as root: the peak RSS
# of each scenario needs /proc/PID/clear_refs (otherwise the sampled RSS
# peak is given). The result table goes to stdout and to --out (default
# ops/bench-results/abuse-<UTC date>.txt), with the load average before and
# after, since figures measured on a busy machine wobble.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-abuse
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

seconds=20
bomb_mib=1024
stalled=600
uploads=64
out=
build=1
keep=0

while (($#)); do
    case $1 in
        --seconds) seconds=${2:?}; shift 2 ;;
        --bomb-mib) bomb_mib=${2:?}; shift 2 ;;
        --stalled) stalled=${2:?}; shift 2 ;;
        --uploads) uploads=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) usage ;;
    esac
done
for number in "$seconds" "$bomb_mib" "$stalled" "$uploads"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$number'"
done
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ -z $out ]]; then
    out=$repo/ops/bench-results/abuse-$(date -u +%Y%m%d-%H%M%S).txt
fi

install_tools curl:curl
# Every stalled upload is a connection; the driver holds them all.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
(($(ulimit -n) > stalled + 200)) || die "the open file limit ($(ulimit -n)) is too low for --stalled $stalled"

release_binaries ingest-api tests -- ingest-api bench_abuse

server_pid=
start_work_dir server_pid

# --- the server and the two tenants ------------------------------------------------

server_dir=$work/server
mkdir -p "$server_dir"
config=$server_dir/server.toml
"$bin/ingest-api" --config "$config" --mode migrate >/dev/null
storage=$server_dir/storage
mint() {
    "$bin/ingest-api" make-token --config "$config" --sub "$1" --validity 1d \
        --pull "$1" --push "$1" --create-cache "$1" | tail -n 1
}
victim_token=$(mint abuse-victim)
hostile_token=$(mint abuse-hostile)

pick_port larder_port
RUST_LOG=warn "$bin/ingest-api" --config "$config" --listen "$HOST:$larder_port" \
    >"$work/server.log" 2>&1 &
server_pid=$!
larder=http://$HOST:$larder_port
wait_http "$larder/" "$server_pid" "$work/server.log"
say "ingest-api (pid $server_pid) serves $larder"
[[ -d $storage ]] || die "the first-start config does not keep storage in $storage"

for tenant in victim hostile; do
    token_var=${tenant}_token
    code=$(curl -s -o "$work/create.json" -w '%{http_code}' -X POST -H "Authorization: Bearer ${!token_var}" \
        -H 'Content-Type: application/json' -d '{"keypair": "Generate", "is_public": false}' \
        "$larder/_api/v1/cache-config/abuse-$tenant")
    [[ $code == 200 || $code == 201 ]] || die "creating abuse-$tenant answered $code: $(cat "$work/create.json")"
done

# --- the scenarios -------------------------------------------------------------------

load_before=$(uptime)
say "running the scenarios (about $((7 * (seconds + 4))) s after the setup)"
"$bin/bench_abuse" --url "$larder" --server-pid "$server_pid" --storage "$storage" \
    --victim-token "$victim_token" --victim-cache abuse-victim \
    --hostile-token "$hostile_token" --hostile-cache abuse-hostile \
    --seconds "$seconds" --bomb-mib "$bomb_mib" --stalled "$stalled" --uploads "$uploads" \
    >"$work/figures.vars"
load_after=$(uptime)
alive=yes
kill -0 "$server_pid" 2>/dev/null || alive="no (it exited: $(tail -n 5 "$work/server.log" | tr '\n' ' '))"

declare -A figure
while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Z0-9_]+$ ]] && figure[$key]=$value
done <"$work/figures.vars"
get() {
    [[ -n ${figure[$1]:-} ]] || die "bench_abuse printed no $1"
    echo "${figure[$1]}"
}
mib_of() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
per_byte() { awk -v w="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f", w / s; else print "-" }'; }

# --- report --------------------------------------------------------------------------

report=$work/report.txt
{
    echo "Larder abuse benchmark, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "larder: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD 2>/dev/null || echo '+changes'), release build, one machine (SQLite, local storage, in-process pipeline), default limits"
    echo "victim: one 4 MiB path, its narinfo and NAR fetched one request at a time for ${seconds} s per scenario (15 s timeout)"
    echo "hostile: bombs of ${bomb_mib} MiB of zeros; its own ${bomb_mib} MiB NAR of zeros for .ls and NAR GETs; $uploads concurrent uploads; $stalled stalled uploads"
    echo "uptime before: $load_before"
    echo "uptime after:  $load_after"
    echo "server still running at the end: $alive"
    echo
    printf '%-13s | %8s %8s %4s | %8s %8s %4s | %8s | %10s %10s %10s %9s | %s\n' \
        "" "narinfo" "narinfo" "" "NAR" "NAR" "" "server" "hostile" "server" "storage" "written" \
        "hostile requests"
    printf '%-13s | %8s %8s %4s | %8s %8s %4s | %8s | %10s %10s %10s %9s | %s\n' \
        scenario "p50 ms" "p99 ms" fail "p50 ms" "p99 ms" fail "peak MiB" "sent MiB" \
        "wrote MiB" "peak MiB" "per byte" "(2xx/4xx/5xx/closed/unanswered)"
    for scenario in none zstd-bomb xz-bomb ls-loop nar-repeated uploads stalled; do
        k=${scenario^^}
        k=${k//-/_}
        requests="$(get "${k}_ATTACK_REQUESTS"): $(get "${k}_ATTACK_2XX")/$(get "${k}_ATTACK_4XX")/$(get "${k}_ATTACK_5XX")/$(get "${k}_ATTACK_CLOSED")/$(get "${k}_ATTACK_UNANSWERED")"
        if [[ $scenario == stalled ]]; then
            requests+=", at the end $(get "${k}_STALLED_OPEN") open, $(get "${k}_STALLED_DROPPED") dropped"
        fi
        printf '%-13s | %8s %8s %4s | %8s %8s %4s | %8s | %10s %10s %10s %9s | %s\n' \
            "$scenario" \
            "$(get "${k}_NARINFO_P50_MS")" "$(get "${k}_NARINFO_P99_MS")" "$(get "${k}_NARINFO_FAILED")" \
            "$(get "${k}_NAR_P50_MS")" "$(get "${k}_NAR_P99_MS")" "$(get "${k}_NAR_FAILED")" \
            "$(mib "$(get "${k}_PEAK_RSS_KIB")")" \
            "$(mib_of "$(get "${k}_ATTACK_BODY_BYTES")")" "$(mib_of "$(get "${k}_WRITE_BYTES")")" \
            "$(mib_of "$(get "${k}_STORAGE_GROWTH_PEAK")")" \
            "$(per_byte "$(get "${k}_WRITE_BYTES")" "$(get "${k}_ATTACK_BODY_BYTES")")" \
            "$requests"
    done
    echo
    echo "narinfo/NAR: the victim's requests (counts in ${out%.txt}.vars); fail: failed or timed out."
    echo "written per byte: server writes (staging, chunks, database) / body bytes of the hostile requests started."
    echo "hostile requests: started: answered 2xx/4xx/5xx, closed without an answer, still unanswered at the end."
    echo "storage peak: the storage directory's largest growth during the scenario."
} >"$report"

mkdir -p "$(dirname "$out")"
cp "$report" "$out"
cp "$work/figures.vars" "${out%.txt}.vars"
echo
cat "$report"
echo
