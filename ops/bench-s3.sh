#!/usr/bin/env bash
# The S3 benchmark (issue 16): what one large NAR costs on an object store,
# against Garage behind a proxy that counts every S3 request and can hold
# each one for a set delay (a real object store's round trip, ~25 ms inside
# a region; Garage on loopback answers in well under a millisecond). Not a
# test: it reports figures against the issue's targets, it asserts no
# timing.
#
#   ops/bench-s3.sh [--nar-mib N] [--nar-source DIR] [--delay-ms N]
#                   [--downloads N] [--pack-mib N] [--staging local|s3]
#                   [--ingest-api PATH] [--perf DIR] [--out FILE]
#                   [--no-build] [--keep]
#
# What it reports, in one run:
#   1. S3 requests per GiB pushed (target <= 64): a NAR of --nar-mib MiB
#      (default 2048) pushed through Attic's `upload-path` until visible,
#      every request counted, by kind (staging the upload, reading it back,
#      storing chunks, deleting the staged copy), with no added delay. By
#      default the S3 server stages in a local directory (`[storage]
#      staging-path`, as a single-machine server on S3 should), so only
#      packs reach the bucket; --staging s3 stages in the bucket, as the
#      distributed topology must.
#   2. S3 requests per GiB served (target <= 64): one download of that NAR,
#      with the delay.
#   3. Time to first byte of that NAR's body (target <= 3 round trips on
#      S3, i.e. 3 x --delay-ms; <= 50 ms on local storage: the same NAR is
#      pushed to a second server on a local storage directory), the median
#      of --downloads.
#   4. One-stream download throughput of the NAR over S3 with the delay
#      (target >= 100 MiB/s of NAR, i.e. of uncompressed NAR bytes per
#      second), the median of --downloads; also the compressed bytes/s.
#   5. Stored bytes and objects against the per-chunk layout (one object
#      per chunk), from the database's chunk rows and the storage itself.
# 1-4 are measured twice: for the NAR as the push pipeline stored it, and
# for the same kind of NAR (the same files behind a different first line)
# seeded through the store layer with its frames in pack objects of
# --pack-mib MiB (default 32; 0 skips it), the layout issue 16's packs
# give: the read path's figures for packed storage, whatever the push
# pipeline writes so far.
# The load average is reported: figures measured on a busy machine wobble.
#
# How: a fresh directory under /tmp holds everything. Garage starts there
# (`ops/services.sh start DIR garage`), `s3_proxy` (tests/src/bin) in front
# of it, and two one-machine `ingest-api` servers (SQLite, embedded queue):
# one on S3 through the proxy, one on a storage directory. `bench_push`
# makes the NAR (one regular file holding the first --nar-mib MiB of the
# regular files under --nar-source, default ~/.rustup/toolchains: real
# bytes, which compress as real data does), pushes it and times the
# downloads (first byte of the body, not of the head). One download of
# each server is checked: it decompresses to the NAR pushed. Every process
# started here is stopped on the way out, by pid, also on failure.
#
# --perf DIR records a CPU profile of the server (`perf record -g -F 499`)
# during each series of downloads, into DIR/{local,s3,s3nodelay}.data, and
# writes `perf report --no-children` of each beside it (.txt).
# --ingest-api PATH measures another build of the server (e.g. one of
# `main`, for a before/after comparison); the other binaries are this
# checkout's release builds (made unless --no-build). The result table goes
# to stdout and to --out (default ops/bench-results/s3-<UTC date>.txt).
# Defaults: --delay-ms 25, --downloads 3. --keep keeps the work directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

bench_name=bench-s3
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

nar_mib=2048
nar_source=$HOME/.rustup/toolchains
delay_ms=25
downloads=3
server_bin=
perf_dir=
pack_mib=32
staging=local
out=
build=1
keep=0

while (($#)); do
    case $1 in
        --nar-mib) nar_mib=${2:?}; shift 2 ;;
        --nar-source) nar_source=${2:?}; shift 2 ;;
        --delay-ms) delay_ms=${2:?}; shift 2 ;;
        --downloads) downloads=${2:?}; shift 2 ;;
        --ingest-api) server_bin=${2:?}; shift 2 ;;
        --perf) perf_dir=${2:?}; shift 2 ;;
        --pack-mib) pack_mib=${2:?}; shift 2 ;;
        --staging) staging=${2:?}; shift 2 ;;
        --out) out=${2:?}; shift 2 ;;
        --no-build) build=0; shift ;;
        --keep) keep=1; shift ;;
        *) usage ;;
    esac
done
for number in "$nar_mib" "$downloads"; do
    [[ $number =~ ^[1-9][0-9]*$ ]] || die "expected a positive whole number, got '$number'"
done
[[ $delay_ms =~ ^[0-9]+$ ]] || die "--delay-ms: expected a whole number, got '$delay_ms'"
[[ $pack_mib =~ ^[0-9]+$ ]] || die "--pack-mib: expected a whole number, got '$pack_mib'"
[[ $staging == local || $staging == s3 ]] || die "--staging: expected local or s3, got '$staging'"
[[ -d $nar_source ]] || die "--nar-source $nar_source is not a directory"
started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
if [[ -z $out ]]; then
    out=$repo/ops/bench-results/s3-$(date -u +%Y%m%d-%H%M%S).txt
fi

install_tools curl:curl zstd:zstd sqlite3:sqlite3
if [[ -n $perf_dir ]]; then
    command -v perf >/dev/null || die "--perf needs perf (linux-perf)"
    mkdir -p "$perf_dir"
    perf_dir=$(cd "$perf_dir" && pwd)
fi

release_binaries ingest-api tests -- ingest-api bench_push s3_proxy
server_bin=${server_bin:-$bin/ingest-api}
[[ -x $server_bin ]] || die "--ingest-api $server_bin is not an executable"

proxy_pid=
s3_server_pid=
local_server_pid=
start_work_dir s3_server_pid local_server_pid proxy_pid
services=$work/services
# services.sh checks that its service users could reach the directory.
chmod 711 "$work"
before_cleanup() {
    [[ -f $services/env ]] && bash "$repo/ops/services.sh" stop "$services" >/dev/null 2>&1
}

# --- Garage, the proxy ---------------------------------------------------------

say "starting Garage"
bash "$repo/ops/services.sh" start "$services" garage >"$work/services.log" 2>&1 ||
    die "Garage did not start: $(tail -n 20 "$work/services.log")"
# shellcheck disable=SC1091
source "$services/env"

pick_port proxy_port
pick_port control_port
"$bin/s3_proxy" --listen "$HOST:$proxy_port" --control "$HOST:$control_port" \
    --upstream "$LARDER_TEST_S3_ENDPOINT" --delay-ms 0 >"$work/proxy.log" 2>&1 &
proxy_pid=$!
control=http://$HOST:$control_port
wait_http "$control/counts" "$proxy_pid" "$work/proxy.log"

# Zeroes the proxy's counts; `counts` prints them as KEY=VALUE lines.
reset_counts() { curl -sf -X POST "$control/reset" >/dev/null; }
counts() { curl -sf "$control/counts"; }
set_delay() { curl -sf -X PUT "$control/delay/$1" >/dev/null; }

# --- the servers ---------------------------------------------------------------

# Starts a server whose config is in DIR, on S3 through the proxy when
# the second argument is `s3`; sets the variables named by the third and
# fourth arguments to its pid and URL.
start_server() {
    local dir=$1 storage=$2 listen_port
    mkdir -p "$dir"
    "$server_bin" --config "$dir/server.toml" --mode migrate >/dev/null
    if [[ $storage == s3 ]]; then
        # The [storage] section written on first start, replaced.
        local staging_line=
        [[ $staging == local ]] && staging_line="staging-path = \"$dir/staging\""
        awk -v endpoint="http://$HOST:$proxy_port" -v region="$LARDER_TEST_S3_REGION" \
            -v staging_line="$staging_line" \
            -v bucket="$LARDER_TEST_S3_BUCKET" -v key="$LARDER_TEST_S3_ACCESS_KEY_ID" \
            -v secret="$LARDER_TEST_S3_SECRET_ACCESS_KEY" '
            /^\[storage\]$/ { print; print "type = \"s3\""; print "endpoint = \"" endpoint "\"";
                print "region = \"" region "\""; print "bucket = \"" bucket "\"";
                print "access-key-id = \"" key "\""; print "secret-access-key = \"" secret "\"";
                print "prefix = \"bench-s3/\"";
                if (staging_line != "") print staging_line; skip = 1; next }
            /^\[/ { skip = 0 }
            !skip { print }' "$dir/server.toml" >"$dir/server.toml.new"
        mv "$dir/server.toml.new" "$dir/server.toml"
    fi
    pick_port listen_port
    LARDER_INGEST__WAIT_FOR_VISIBLE="30 minutes" RUST_LOG=warn \
        "$server_bin" --config "$dir/server.toml" --listen "$HOST:$listen_port" >"$dir/server.log" 2>&1 &
    printf -v "$3" '%s' "$!"
    printf -v "$4" '%s' "http://$HOST:$listen_port"
    wait_http "http://$HOST:$listen_port/" "$!" "$dir/server.log"
}

start_server "$work/s3" s3 s3_server_pid s3_url
start_server "$work/local" local local_server_pid local_url
say "ingest-api on S3 (pid $s3_server_pid) at $s3_url, on local storage (pid $local_server_pid) at $local_url"

cache=bench-s3
for server in s3 local; do
    config=$work/$server/server.toml
    token=$("$server_bin" make-token --config "$config" --sub bench-s3 --validity 1d \
        --pull "$cache" --push "$cache" --create-cache "$cache" | tail -n 1)
    printf -v "${server}_token" '%s' "$token"
    url_var=${server}_url
    code=$(curl -s -o "$work/create.json" -w '%{http_code}' -X POST \
        -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d '{"keypair": "Generate", "is_public": false}' "${!url_var}/_api/v1/cache-config/$cache")
    [[ $code == 200 || $code == 201 ]] || die "creating $cache answered $code: $(cat "$work/create.json")"
done

# --- the NAR -------------------------------------------------------------------

say "making a NAR of $nar_mib MiB of files under $nar_source"
nar=$work/bench.nar
"$bin/bench_push" make-nar "$nar" "$nar_source" "$nar_mib"
nar_bytes=$(stat -c %s "$nar")
nar_sha=$(sha256sum "$nar" | cut -d' ' -f1)
gib_of_nar=$(awk -v b="$nar_bytes" 'BEGIN { printf "%.4f", b / 1073741824 }')

load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# --- pushes --------------------------------------------------------------------

# KEY=VALUE lines of FILE into the associative array named by $2, prefixed.
declare -A v
read_vars() {
    local key value
    while IFS='=' read -r key value; do
        [[ $key =~ ^[A-Z0-9_]+$ ]] && v[$2$key]=$value
    done <"$1"
}

say "pushing the NAR to the S3 server (staging: $staging; requests counted, no delay)"
reset_counts
"$bin/bench_push" --url "$s3_url" --token "$s3_token" --cache "$cache" large "$nar" >"$work/push-s3.vars"
# The staged copy is deleted right after the path is visible.
sleep 2
counts >"$work/counts-push"
read_vars "$work/push-s3.vars" push_s3_
read_vars "$work/counts-push" push_
nar_url=${v[push_s3_LARGE_NAR_URL_0]}

say "pushing the NAR to the local server"
"$bin/bench_push" --url "$local_url" --token "$local_token" --cache "$cache" large "$nar" >"$work/push-local.vars"
read_vars "$work/push-local.vars" push_local_

# --- downloads -----------------------------------------------------------------

# Checks that SERVER's NAR decompresses to the one pushed.
check_download() {
    local url=$1 token=$2 sha
    sha=$(curl -sf -H "Authorization: Bearer $token" "$url/$cache/$nar_url" | zstd -dcq | sha256sum | cut -d' ' -f1)
    [[ $sha == "$nar_sha" ]] || die "the NAR served by $url decompresses to sha256 $sha, not $nar_sha"
}

# Downloads the NAR $downloads times from the server at URL, whose pid is
# PID (after one warm-up), into variables prefixed with PREFIX; with
# --perf, profiles the server meanwhile.
downloads() {
    local url=$1 token=$2 pid=$3 prefix=$4 perf_pid=
    "$bin/bench_push" --url "$url" --token "$token" --cache "$cache" download "$nar_url" 1 >/dev/null
    if [[ -n $perf_dir ]]; then
        perf record -q -g -F 499 -p "$pid" -o "$perf_dir/${prefix%_}.data" 2>"$perf_dir/${prefix%_}.log" &
        perf_pid=$!
        sleep 0.5
    fi
    "$bin/bench_push" --url "$url" --token "$token" --cache "$cache" download "$nar_url" "$downloads" \
        >"$work/$prefix.vars"
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid"
        wait "$perf_pid" || true
        perf report -i "$perf_dir/${prefix%_}.data" --no-children --stdio --percent-limit 1.5 \
            >"$perf_dir/${prefix%_}.txt" 2>/dev/null || true
    fi
    read_vars "$work/$prefix.vars" "$prefix"
}

# Measures the NAR at $nar_url (which decompresses to $nar_sha) on both
# servers, into variables prefixed with LAYOUT: local downloads, one
# counted download from S3 with the delay, downloads from S3 with and
# without it.
measure() {
    local layout=$1
    say "$layout: checking both servers' NAR"
    check_download "$s3_url" "$s3_token"
    check_download "$local_url" "$local_token"
    v[${layout}file_bytes]=$(curl -sfI -H "Authorization: Bearer $s3_token" "$s3_url/$cache/$nar_url" |
        tr -d '\r' | awk 'tolower($1) == "content-length:" { print $2 }')

    say "$layout: downloading from local storage"
    downloads "$local_url" "$local_token" "$local_server_pid" "${layout}local_"

    say "$layout: one download from S3 with ${delay_ms} ms per request, requests counted"
    set_delay "$delay_ms"
    reset_counts
    "$bin/bench_push" --url "$s3_url" --token "$s3_token" --cache "$cache" download "$nar_url" 1 >/dev/null
    counts >"$work/counts-serve"
    read_vars "$work/counts-serve" "${layout}serve_"

    say "$layout: downloading from S3 with ${delay_ms} ms per request"
    downloads "$s3_url" "$s3_token" "$s3_server_pid" "${layout}s3_"
    set_delay 0

    say "$layout: downloading from S3 without delay"
    downloads "$s3_url" "$s3_token" "$s3_server_pid" "${layout}s3nodelay_"
}

# --- what is stored ------------------------------------------------------------

chunk_stats() {
    sqlite3 "$work/$1/server.db" \
        "SELECT COUNT(*), COUNT(DISTINCT object_key), COALESCE(SUM(object_length), 0) FROM chunks WHERE state = 'valid'"
}
IFS='|' read -r s3_chunks s3_objects s3_frame_bytes <<<"$(chunk_stats s3)"
IFS='|' read -r local_chunks local_objects local_frame_bytes <<<"$(chunk_stats local)"
# The local storage's objects other than staging, their bytes and their
# disk usage.
local_files=$(find "$work/local/storage" -path "$work/local/storage/staging" -prune -o -type f -print | wc -l)
local_disk_kib=$(du -sk --exclude=staging "$work/local/storage" | cut -f1)
# Each chunk object on a file system takes at least one 4 KiB block.
per_chunk_disk_kib=$(sqlite3 "$work/local/server.db" \
    "SELECT COALESCE(SUM((object_length + 4095) / 4096 * 4), 0) FROM chunks WHERE state = 'valid'")

measure pushed_

if ((pack_mib > 0)); then
    say "seeding the same kind of NAR in packs of $pack_mib MiB into both servers"
    for server in s3 local; do
        "$bin/bench_push" seed-packed "$work/$server/server.toml" "$cache" "$nar_source" "$nar_mib" \
            "$pack_mib" >"$work/packed-$server.vars"
        read_vars "$work/packed-$server.vars" "packed_${server}_"
    done
    [[ ${v[packed_s3_PACKED_NAR_URL]} == "${v[packed_local_PACKED_NAR_URL]}" ]] ||
        die "the two servers were seeded with different NARs"
    nar_url=${v[packed_s3_PACKED_NAR_URL]}
    nar_sha=${v[packed_s3_PACKED_NAR_SHA256]}
    measure packed_
fi

load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# The median over the downloads of FIELD (FIRST_BYTE_MS, SECONDS) of PREFIX.
median_of() {
    local i values=
    for ((i = 0; i < downloads; i++)); do values+="${v[${1}DOWNLOAD_${2}_$i]} "; done
    median <<<"$values"
}

# --- report --------------------------------------------------------------------

per_gib() { awk -v n="$1" -v g="$gib_of_nar" 'BEGIN { printf "%.1f", n / g }'; }
at_most() { awk -v a="$1" -v t="$2" 'BEGIN { print (a <= t ? "met" : "MISSED") }'; }
kinds() {
    local prefix=$1 kind out=
    for kind in GET GET_RANGE LIST HEAD PUT PUT_PART POST DELETE OTHER; do
        [[ ${v[$prefix$kind]:-0} == 0 ]] || out+="$kind ${v[$prefix$kind]}, "
    done
    echo "${out%, }"
}
row() { printf '%-50s %12s %10s  %s\n' "$@"; }
push_requests=${v[push_TOTAL]}

# The figures of one LAYOUT (pushed_, packed_).
layout_report() {
    local l=$1 serve_requests ttfb_local ttfb_s3 ttfb_s3_nodelay seconds_s3 seconds_local
    local seconds_s3_nodelay round_trips nar_mibps_s3 file_mibps_s3
    serve_requests=${v[${l}serve_TOTAL]}
    ttfb_local=$(median_of "${l}local_" FIRST_BYTE_MS)
    ttfb_s3=$(median_of "${l}s3_" FIRST_BYTE_MS)
    ttfb_s3_nodelay=$(median_of "${l}s3nodelay_" FIRST_BYTE_MS)
    seconds_s3=$(median_of "${l}s3_" SECONDS)
    seconds_local=$(median_of "${l}local_" SECONDS)
    seconds_s3_nodelay=$(median_of "${l}s3nodelay_" SECONDS)
    round_trips=$(awk -v t="$ttfb_s3" -v d="$delay_ms" 'BEGIN { printf "%.1f", (d > 0 ? t / d : 0) }')
    nar_mibps_s3=$(mibps "$nar_bytes" "$seconds_s3")
    file_mibps_s3=$(mibps "${v[${l}file_bytes]}" "$seconds_s3")
    row "S3 requests per GiB served" "$(per_gib "$serve_requests")" "<= 64" \
        "$(at_most "$(per_gib "$serve_requests")" 64)"
    row "time to first byte, local storage (ms)" "$ttfb_local" "<= 50" "$(at_most "$ttfb_local" 50)"
    row "time to first byte, S3 + ${delay_ms} ms (round trips)" "$round_trips" "<= 3" \
        "$(at_most "$round_trips" 3)"
    row "one stream, S3 + ${delay_ms} ms (MiB/s of NAR)" "$nar_mibps_s3" ">= 100" \
        "$(verdict "$nar_mibps_s3" 100)"
    echo "  served as ${v[${l}file_bytes]} bytes of frames; S3 requests for one download: $serve_requests ($(kinds "${l}serve_"))"
    echo "  time to first byte (ms, median of $downloads): local $ttfb_local, S3 + ${delay_ms} ms $ttfb_s3, S3 without delay $ttfb_s3_nodelay"
    echo "  one stream (MiB/s of NAR): local $(mibps "$nar_bytes" "$seconds_local"), S3 + ${delay_ms} ms $nar_mibps_s3 ($file_mibps_s3 MiB/s as sent), S3 without delay $(mibps "$nar_bytes" "$seconds_s3_nodelay")"
}

report=$work/report.txt
{
    echo "Larder S3 benchmark, $started_at"
    echo "machine: $(nproc) cores, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
    echo "larder: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- ingest-api common 2>/dev/null || echo '+changes'), server binary $server_bin"
    echo "NAR: one file of the first $nar_mib MiB of files under $nar_source, $nar_bytes bytes"
    echo "S3: Garage 1 node on loopback behind s3_proxy; ${delay_ms} ms added to every request while serving (none while pushing); staging: $staging"
    echo "load average (1, 5, 15 min) before the runs: $load_before; after: $load_after (above ~1 means other work shared the $(nproc) cores)"
    echo
    row "" value target ""
    row "S3 requests per GiB pushed" "$(per_gib "$push_requests")" "<= 64" \
        "$(at_most "$(per_gib "$push_requests")" 64)"
    echo "  push, S3 requests: $push_requests ($(kinds push_)); visible after ${v[push_s3_LARGE_SECONDS_0]} s on S3, ${v[push_local_LARGE_SECONDS_0]} s on local storage"
    echo
    echo "The NAR as the push pipeline stored it:"
    layout_report pushed_
    if ((pack_mib > 0)); then
        echo
        echo "The same kind of NAR seeded in packs of $pack_mib MiB (64 KiB chunks; the read path on packed storage):"
        layout_report packed_
    fi
    echo
    echo "stored (S3 server): $s3_chunks chunks in $s3_objects objects, $s3_frame_bytes bytes of frames; one object per chunk would be $s3_chunks objects"
    echo "stored (local server): $local_chunks chunks in $local_objects objects ($local_files files), ${local_disk_kib} KiB on disk; one file per chunk would take ${per_chunk_disk_kib} KiB in 4 KiB blocks"
    echo "NAR $nar_bytes bytes, stored as $s3_frame_bytes bytes: ratio $(ratio "$nar_bytes" "$s3_frame_bytes")"
} >"$report"

mkdir -p "$(dirname "$out")"
cp "$report" "$out"
echo
cat "$report"
echo
say "written to $out"
