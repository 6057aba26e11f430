#!/usr/bin/env bash
# The serving benchmark (issue 3): Larder's `ingest-api` (release build)
# against nginx from Debian serving the same bytes, in one run on this
# machine. Not a test: it reports figures and ratios, it asserts no timing.
#
#   ops/bench-serve.sh [--duration SECONDS] [--wrk-reps N] [--nar-reps N]
#                      [--nar-mib N] [--narinfo-source DIR] [--nar-source DIR]
#                      [--out FILE] [--no-build] [--keep]
#
# What it measures:
#   1. narinfo requests/s with wrk at 1 and 16 connections, the same
#      narinfo of a private cache (token sent as `Authorization: Bearer`):
#      Larder looks it up, renders and signs it (and keeps the answer in
#      its read cache for a short while, so repeated requests mostly measure
#      that path); nginx serves the text Larder rendered, saved as a static
#      file. Target: Larder >= 0.5x nginx.
#      Also, for information (no target): narinfo misses/s at 16
#      connections, each request for a random hash no cache has (wrk script
#      ops/bench/random-narinfo.lua), i.e. the lookup no cache can answer.
#   2. NAR download MiB/s on one stream (curl, median of --nar-reps) of a
#      large multi-chunk NAR: Larder streams it from its chunk objects;
#      nginx serves the identical compressed bytes saved from Larder's
#      response. Target: Larder >= 0.2x nginx.
#   3. Each server's CPU time per request (from /proc/PID/stat), the NAR's
#      time to first byte, and each server's peak resident memory (VmHWM,
#      summed over nginx's processes).
# Larder and nginx runs alternate, so that other load on the machine weighs
# on both alike; the load average is reported, since ratios measured on a
# busy machine still wobble.
#
# How: a fresh directory under /tmp holds everything. `ingest-api --mode
# migrate` creates a first-start config there (SQLite, storage directory);
# `bench_serve` (tests/src/bin/bench_serve.rs) seeds a private cache through
# the store layer with two paths: the NAR of --narinfo-source (default
# /usr/lib/python3.11) for the narinfo, and a flat NAR of the first
# --nar-mib MiB (default 320) of regular files under --nar-source (default
# /usr/lib/x86_64-linux-gnu), cut into 64 KiB chunks, for the download.
# `ingest-api make-token` mints a pull token; then the server and nginx start
# on 127.0.0.1, each on a free port picked at random. Every process started
# here is stopped on the way out, by pid, also on failure or Ctrl-C.
#
# Installs wrk, nginx, curl and zstd from Debian when missing (idempotent;
# nginx's package is kept from starting its own service), and builds the two
# binaries in release mode unless --no-build. The result table goes to
# stdout and to --out (default ops/bench-results/serve-<UTC date>.txt).
# Defaults: --duration 10 (seconds per wrk run), --wrk-reps 3 (median),
# --nar-reps 5 (median). --keep keeps the work directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-serve
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

duration=10
wrk_reps=3
nar_reps=5
nar_mib=320
narinfo_source=/usr/lib/python3.11
nar_source=/usr/lib/x86_64-linux-gnu
out=
build=1
keep=0

while (($#)); do
    case $1 in
        --duration) duration=${2:?}; shift 2 ;;
        --wrk-reps) wrk_reps=${2:?}; shift 2 ;;
        --nar-reps) nar_reps=${2:?}; shift 2 ;;
        --nar-mib) nar_mib=${2:?}; shift 2 ;;
        --narinfo-source) narinfo_source=${2:?}; shift 2 ;;
        --nar-source) nar_source=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) usage ;;
        *) usage ;;
    esac
done
for number in "$duration" "$wrk_reps" "$nar_reps" "$nar_mib"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$number'"
done
[[ -d $narinfo_source ]] || die "--narinfo-source $narinfo_source is not a directory"
[[ -d $nar_source ]] || die "--nar-source $nar_source is not a directory"
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ -z $out ]]; then
    out=$repo/ops/bench-results/serve-$(date -u +%Y%m%d-%H%M%S).txt
fi

# --- tools -------------------------------------------------------------------

install_tools wrk:wrk nginx:nginx curl:curl zstd:zstd

release_binaries ingest-api tests -- ingest-api bench_serve

# --- processes and cleanup ---------------------------------------------------

server_pid=
nginx_pid=
larder_port=
nginx_port=
start_work_dir server_pid nginx_pid

nginx_pids() {
    local workers
    workers=$(pgrep -P "$nginx_pid" | tr '\n' ' ' || true)
    echo "$nginx_pid $workers"
}

# --- Larder: config, seed, token, server ------------------------------------

server_dir=$work/server
mkdir -p "$server_dir"
config=$server_dir/server.toml
"$bin/ingest-api" --config "$config" --mode migrate >/dev/null

say "seeding: the NAR of $narinfo_source, and $nar_mib MiB of files from $nar_source"
"$bin/bench_serve" --config "$config" --narinfo-source "$narinfo_source" \
    --nar-source "$nar_source" --nar-mib "$nar_mib" >"$work/seed.vars"
declare -A seed
while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Z0-9_]+$ ]] && seed[$key]=$value
done <"$work/seed.vars"
for key in CACHE NARINFO_HASH NARINFO_NAR_SIZE NARINFO_CHUNKS LARGE_NAR_URL LARGE_NAR_SIZE \
    LARGE_FILE_SIZE LARGE_CHUNKS LARGE_FILES LARGE_NAR_SHA256_HEX; do
    [[ -n ${seed[$key]:-} ]] || die "bench_serve printed no $key"
done
cache=${seed[CACHE]}

token=$("$bin/ingest-api" make-token --config "$config" --sub bench-serve \
    --validity 1d --pull "$cache" | tail -n 1)
auth="Authorization: Bearer $token"

pick_port larder_port
RUST_LOG=warn "$bin/ingest-api" --config "$config" --listen "$HOST:$larder_port" \
    >"$work/server.log" 2>&1 &
server_pid=$!
larder=http://$HOST:$larder_port
wait_http "$larder/" "$server_pid" "$work/server.log"
say "ingest-api (pid $server_pid) serves $larder"

# --- the bytes Larder serves, saved for nginx --------------------------------

www=$work/www
narinfo_path=/$cache/${seed[NARINFO_HASH]}.narinfo
nar_path=/$cache/${seed[LARGE_NAR_URL]}
mkdir -p "$www/$cache/nar"

code=$(curl -s -H "$auth" -o "$www$narinfo_path" -w '%{http_code}' "$larder$narinfo_path")
[[ $code == 200 ]] || die "GET $narinfo_path answered $code: $(head -c 300 "$www$narinfo_path")"
# Without the token the cache is private: this must not be a 200.
code=$(curl -s -o /dev/null -w '%{http_code}' "$larder$narinfo_path")
[[ $code == 401 ]] || die "GET $narinfo_path without a token answered $code, expected 401"
narinfo_bytes=$(stat -c %s "$www$narinfo_path")

code=$(curl -s -H "$auth" -o "$www$nar_path" -w '%{http_code}' "$larder$nar_path")
[[ $code == 200 ]] || die "GET $nar_path answered $code"
nar_file_bytes=$(stat -c %s "$www$nar_path")
[[ $nar_file_bytes == "${seed[LARGE_FILE_SIZE]}" ]] ||
    die "the NAR download is $nar_file_bytes bytes; its narinfo says ${seed[LARGE_FILE_SIZE]}"
say "checking that the downloaded NAR decompresses to the seeded one"
nar_sha=$(zstd -dcq "$www$nar_path" | sha256sum | cut -d' ' -f1)
[[ $nar_sha == "${seed[LARGE_NAR_SHA256_HEX]}" ]] ||
    die "the downloaded NAR decompresses to sha256 $nar_sha, not ${seed[LARGE_NAR_SHA256_HEX]}"
chmod -R a+rX "$www"
chmod a+x "$work"

# --- nginx -------------------------------------------------------------------

nginx_dir=$work/nginx
mkdir -p "$nginx_dir/tmp"
pick_port nginx_port
sed -e "s|@WORKERS@|$(nproc)|g" -e "s|@DIR@|$nginx_dir|g" -e "s|@PORT@|$nginx_port|g" \
    -e "s|@ROOT@|$www|g" "$repo/ops/bench/nginx.conf.in" >"$nginx_dir/nginx.conf"
nginx -p "$nginx_dir" -c "$nginx_dir/nginx.conf" -e "$nginx_dir/error.log" \
    >"$nginx_dir/stdout.log" 2>&1 &
nginx_pid=$!
reference=http://$HOST:$nginx_port
wait_http "$reference/" "$nginx_pid" "$nginx_dir/error.log"
cmp -s <(curl -s "$reference$narinfo_path") "$www$narinfo_path" ||
    die "nginx does not serve the saved narinfo"
absent=/$cache/00000000000000000000000000000000.narinfo
for server in "$larder" "$reference"; do
    code=$(curl -s -H "$auth" -o /dev/null -w '%{http_code}' "$server$absent")
    [[ $code == 404 ]] || die "GET $server$absent answered $code, expected 404"
done
say "nginx (pid $nginx_pid) serves $reference"

# --- narinfo requests/s ------------------------------------------------------

# One wrk run against URL with CONNECTIONS for SECONDS, the server being
# the PIDS that follow; writes "requests/s requests cpu_ticks" to
# $work/run. With `wrk_script` set, wrk runs that script (and every answer
# must be a miss, a 404); without, every answer must be a 2xx: a benchmark
# of errors measures nothing. (Not called in a command substitution, so
# that a failure stops the script.)
wrk_script=
wrk_run() {
    local url=$1 connections=$2 seconds=$3 threads output requests rps errors before after
    local script_args=()
    shift 3
    threads=$((connections < 2 ? 1 : 2))
    if [[ -n $wrk_script ]]; then
        script_args=(-s "$wrk_script" "$url" -- "/$cache/")
    else
        script_args=("$url")
    fi
    before=$(cpu_ticks "$@")
    output=$(wrk -t "$threads" -c "$connections" -d "${seconds}s" -H "$auth" "${script_args[@]}")
    after=$(cpu_ticks "$@")
    if grep -q 'Socket errors' <<<"$output"; then
        die "wrk saw socket errors on $url: $(grep 'Socket errors' <<<"$output")"
    fi
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$output")
    requests=$(awk '/requests in/ {print $1}' <<<"$output")
    [[ -n $rps && -n $requests ]] || die "could not read wrk's output: $output"
    errors=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$output")
    if [[ -n $wrk_script ]]; then
        [[ $errors == "$requests" ]] ||
            die "wrk got $((requests - ${errors:-0})) answers other than misses from $url"
    else
        [[ -z $errors ]] || die "wrk got $errors non-2xx answers from $url"
    fi
    echo "$rps $requests $((after - before))" >"$work/run"
}

# Sets `pids` to the processes of TARGET (larder or nginx) and `root` to
# its URL.
select_target() {
    if [[ $1 == larder ]]; then
        root=$larder
        pids=("$server_pid")
    else
        root=$reference
        read -r -a pids <<<"$(nginx_pids)"
    fi
}

# What wrk asks for: the narinfo, or the server for a script to fill in.
wrk_url() {
    if [[ -n $wrk_script ]]; then
        echo "$root"
    else
        echo "$root$narinfo_path"
    fi
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# Runs alternate, Larder then nginx, so that a drift in what else the
# machine is doing weighs on both sides alike.
clock_ticks=$(getconf CLK_TCK)
declare -A rps cpu_us results total_requests total_ticks
# A scenario is a connection count, and `miss` for random absent paths.
for scenario in 1 16 miss16; do
    connections=${scenario#miss}
    wrk_script=
    [[ $scenario == miss* ]] && wrk_script=$repo/ops/bench/random-narinfo.lua
    for target in larder nginx; do
        select_target "$target"
        wrk_run "$(wrk_url)" "$connections" 2 "${pids[@]}" # warm-up
        results[$target]=
        total_requests[$target]=0
        total_ticks[$target]=0
    done
    for rep in $(seq 1 "$wrk_reps"); do
        for target in larder nginx; do
            select_target "$target"
            wrk_run "$(wrk_url)" "$connections" "$duration" "${pids[@]}"
            read -r one_rps requests ticks <"$work/run"
            results[$target]+="$one_rps "
            total_requests[$target]=$((total_requests[$target] + requests))
            total_ticks[$target]=$((total_ticks[$target] + ticks))
            say "narinfo, scenario $scenario, $target, run $rep: $one_rps requests/s"
        done
    done
    for target in larder nginx; do
        rps[$target,$scenario]=$(median <<<"${results[$target]}")
        cpu_us[$target,$scenario]=$(awk -v t="${total_ticks[$target]}" -v hz="$clock_ticks" \
            -v n="${total_requests[$target]}" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    done
done
wrk_script=
larder_rss_after_narinfo=$(peak_rss_kib "$server_pid")

# --- NAR download MiB/s ------------------------------------------------------

# One download of URL, the server being the PIDS that follow; writes
# "bytes/s seconds-to-first-byte cpu_ticks" to $work/run.
nar_run() {
    local url=$1 before after result code size speed first_byte
    shift
    before=$(cpu_ticks "$@")
    result=$(curl -s -H "$auth" -o /dev/null \
        -w '%{http_code} %{size_download} %{speed_download} %{time_starttransfer}' "$url")
    after=$(cpu_ticks "$@")
    read -r code size speed first_byte <<<"$result"
    [[ $code == 200 ]] || die "GET $url answered $code"
    [[ $size == "$nar_file_bytes" ]] || die "GET $url sent $size bytes, expected $nar_file_bytes"
    echo "$speed $first_byte $((after - before))" >"$work/run"
}

declare -A mibps nar_cpu_s first_byte_ms first_bytes
for target in larder nginx; do
    select_target "$target"
    nar_run "$root$nar_path" "${pids[@]}" # warm-up: the page cache
    results[$target]=
    first_bytes[$target]=
    total_ticks[$target]=0
done
for rep in $(seq 1 "$nar_reps"); do
    for target in larder nginx; do
        select_target "$target"
        nar_run "$root$nar_path" "${pids[@]}"
        read -r speed first_byte ticks <"$work/run"
        one=$(awk -v s="$speed" 'BEGIN { printf "%.1f", s / 1048576 }')
        results[$target]+="$one "
        first_bytes[$target]+="$first_byte "
        total_ticks[$target]=$((total_ticks[$target] + ticks))
        say "NAR download, $target, run $rep: $one MiB/s (first byte after ${first_byte} s)"
    done
done
for target in larder nginx; do
    mibps[$target]=$(median <<<"${results[$target]}")
    first_byte_ms[$target]=$(tr -s ' ' '\n' <<<"${first_bytes[$target]}" |
        awk 'NF { print $1 * 1000 }' | median)
    nar_cpu_s[$target]=$(awk -v t="${total_ticks[$target]}" -v hz="$clock_ticks" -v n="$nar_reps" \
        'BEGIN { printf "%.2f", t / hz / n }')
done

load_after=$(cut -d' ' -f1-3 /proc/loadavg)
larder_rss=$(peak_rss_kib "$server_pid")
read -r -a pids <<<"$(nginx_pids)"
nginx_rss=$(peak_rss_kib "${pids[@]}")

# --- report ------------------------------------------------------------------

r1=$(ratio "${rps[larder,1]}" "${rps[nginx,1]}")
r16=$(ratio "${rps[larder,16]}" "${rps[nginx,16]}")
rmiss=$(ratio "${rps[larder,miss16]}" "${rps[nginx,miss16]}")
rnar=$(ratio "${mibps[larder]}" "${mibps[nginx]}")

report=$work/report.txt
{
    echo "Larder serving benchmark, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "larder: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- ingest-api common 2>/dev/null || echo '+changes'), release build; $(nginx -v 2>&1 | sed 's/.*: //'); $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)"
    echo "narinfo: $narinfo_path, $narinfo_bytes bytes, signed by the cache's key (NAR of $narinfo_source: ${seed[NARINFO_NAR_SIZE]} bytes, ${seed[NARINFO_CHUNKS]} chunks)"
    echo "large NAR: ${seed[LARGE_FILES]} files of $nar_source, ${seed[LARGE_NAR_SIZE]} bytes, ${seed[LARGE_CHUNKS]} chunks of 64 KiB, $nar_file_bytes bytes compressed"
    echo "load average (1, 5, 15 min) before the runs: $load_before; after: $load_after (anything above ~1 means other work shared the $(nproc) cores)"
    echo "wrk: ${duration} s per run, median of $wrk_reps runs after a 2 s warm-up; NAR: curl, one stream, median of $nar_reps after one warm-up"
    echo
    printf '%-34s %12s %12s %7s %8s  %s\n' "" Larder nginx ratio target ""
    printf '%-34s %12s %12s %7s %8s  %s\n' "narinfo requests/s, 1 connection" \
        "${rps[larder,1]}" "${rps[nginx,1]}" "$r1" ">= 0.5" "$(verdict "$r1" 0.5)"
    printf '%-34s %12s %12s %7s %8s  %s\n' "narinfo requests/s, 16 connections" \
        "${rps[larder,16]}" "${rps[nginx,16]}" "$r16" ">= 0.5" "$(verdict "$r16" 0.5)"
    printf '%-34s %12s %12s %7s %8s  %s\n' "narinfo misses/s (404), 16 conns" \
        "${rps[larder,miss16]}" "${rps[nginx,miss16]}" "$rmiss" "-" "(random absent paths)"
    printf '%-34s %12s %12s %7s %8s  %s\n' "NAR download MiB/s, 1 stream" \
        "${mibps[larder]}" "${mibps[nginx]}" "$rnar" ">= 0.2" "$(verdict "$rnar" 0.2)"
    echo
    printf '%-34s %12s %12s\n' "server CPU us/request, 1 conn" "${cpu_us[larder,1]}" "${cpu_us[nginx,1]}"
    printf '%-34s %12s %12s\n' "server CPU us/request, 16 conns" "${cpu_us[larder,16]}" "${cpu_us[nginx,16]}"
    printf '%-34s %12s %12s\n' "server CPU us/request, misses" "${cpu_us[larder,miss16]}" "${cpu_us[nginx,miss16]}"
    printf '%-34s %12s %12s\n' "server CPU s per NAR download" "${nar_cpu_s[larder]}" "${nar_cpu_s[nginx]}"
    printf '%-34s %12s %12s\n' "NAR time to first byte ms (median)" "${first_byte_ms[larder]}" "${first_byte_ms[nginx]}"
    printf '%-34s %12s %12s\n' "peak RSS MiB (VmHWM), whole run" "$(mib "$larder_rss")" "$(mib "$nginx_rss")"
    printf '%-34s %12s\n' "  Larder's after the narinfo runs" "$(mib "$larder_rss_after_narinfo")"
    echo "(nginx's RSS is summed over its master and $(($(wc -w <<<"${pids[*]}") - 1)) workers)"
} >"$report"

mkdir -p "$(dirname "$out")"
cp "$report" "$out"
echo
cat "$report"
echo
say "written to $out"
