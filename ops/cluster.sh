#!/usr/bin/env bash
# Runs Larder's distributed topology as plain processes on this machine:
# N × `ingest-api --mode api`, N × chunker-worker, N × compressor-worker and
# gc-scheduler, on RabbitMQ, PostgreSQL and Garage from ops/services.sh —
# what compose.yaml describes for containers, for trying it out and for
# ops/bench-distributed.sh. (The test suite starts the same topology
# itself: tests/src/cluster.rs.)
#
#   ops/cluster.sh start DIR [--apis N] [--chunkers N] [--compressors N]
#                            [--services SERVICES_DIR] [--bin-dir DIR]
#                            [-- ENV=VALUE ...]
#   ops/cluster.sh stop DIR
#   ops/cluster.sh status DIR
#
# `start` uses the services already running in SERVICES_DIR (an
# `ops/services.sh start` directory), or starts its own in DIR/services.
# Each cluster gets a fresh PostgreSQL database, its own RabbitMQ virtual
# host and its own key prefix in the bucket, so several can share one set
# of services. The defaults are 2 of each. It writes DIR/larder.toml (the
# config every process runs with; NAME=VALUE arguments after `--` are
# environment variables for every process, e.g. LARDER_… overrides),
# starts the processes with logs
# in DIR/logs/NAME.log, waits until each is ready, and writes DIR/env:
# `export` lines with LARDER_CONFIG, LARDER_CLUSTER_API_URLS (space-
# separated) and LARDER_CLUSTER_PIDS (NAME=PID ...). Binaries come from
# --bin-dir (default $CARGO_TARGET_DIR/debug; build them first).
# `stop` stops the processes with SIGTERM (running jobs finish), then the
# services if `start` started them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)
bench_name=cluster
# shellcheck source=ops/bench/lib.sh
source "$repo/ops/bench/lib.sh"

# Seconds a process may take to say it is ready.
readonly READY_TIMEOUT=60

(($# >= 2)) || usage
command=$1
DIR=$2
shift 2

# The log line (JSON, "message") each kind of process prints when ready.
ready_message() {
    case $1 in
        ingest-api-*) echo serving ;;
        chunker-worker-* | compressor-worker-*) echo "taking jobs" ;;
        gc-scheduler*) echo "reconciling stuck uploads" ;;
    esac
}

start() {
    local apis=2 chunkers=2 compressors=2 services_dir='' bin_dir=''
    local overrides=()
    while (($#)); do
        case $1 in
            --apis) apis=${2:?}; shift 2 ;;
            --chunkers) chunkers=${2:?}; shift 2 ;;
            --compressors) compressors=${2:?}; shift 2 ;;
            --services) services_dir=${2:?}; shift 2 ;;
            --bin-dir) bin_dir=${2:?}; shift 2 ;;
            --) shift; overrides=("$@"); break ;;
            *) usage ;;
        esac
    done
    for number in "$apis" "$chunkers" "$compressors"; do
        [[ $number =~ ^[0-9]+$ ]] || die "expected a whole number, got '$number'"
    done
    for override in "${overrides[@]}"; do
        [[ $override =~ ^[A-Z_][A-Z0-9_]*= ]] || die "expected NAME=VALUE after --, got '$override'"
    done
    bin_dir=${bin_dir:-${CARGO_TARGET_DIR:-$HOME/.cache/larder/target}/debug}
    for binary in ingest-api chunker-worker compressor-worker gc-scheduler; do
        [[ -x $bin_dir/$binary ]] || die "$bin_dir/$binary is missing: build it (cargo build --bins)"
    done
    [[ ! -e $DIR/pids ]] || die "$DIR already holds a cluster: stop it first"
    mkdir -p "$DIR/logs"
    DIR=$(cd "$DIR" && pwd)
    : >"$DIR/pids"

    if [[ -z $services_dir ]]; then
        services_dir=$DIR/services
        bash "$repo/ops/services.sh" start "$services_dir"
        echo "$services_dir" >"$DIR/own-services"
    fi
    [[ -f $services_dir/vars ]] || die "$services_dir holds no services (ops/services.sh start it)"
    # shellcheck source=/dev/null
    source "$services_dir/env"

    local name suffix database vhost
    suffix=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
    database=larder_cluster_$suffix
    "$LARDER_TEST_POSTGRES_BIN_DIR/psql" -q "$LARDER_TEST_POSTGRES_URL" \
        -c "CREATE DATABASE $database" >/dev/null
    vhost=larder-cluster-$suffix
    bash "$repo/ops/services.sh" rabbitmqctl "$services_dir" add_vhost "$vhost" >/dev/null
    bash "$repo/ops/services.sh" rabbitmqctl "$services_dir" set_permissions -p "$vhost" guest '.*' '.*' '.*' >/dev/null

    local config=$DIR/larder.toml
    (
        umask 077
        cat >"$config" <<EOF
# Written by ops/cluster.sh for the cluster in $DIR.
[database]
url = "${LARDER_TEST_POSTGRES_URL%/*}/$database"

[storage]
type = "s3"
endpoint = "$LARDER_TEST_S3_ENDPOINT"
region = "$LARDER_TEST_S3_REGION"
bucket = "$LARDER_TEST_S3_BUCKET"
access-key-id = "$LARDER_TEST_S3_ACCESS_KEY_ID"
secret-access-key = "$LARDER_TEST_S3_SECRET_ACCESS_KEY"
prefix = "cluster-$suffix/"

[queue]
type = "amqp"
url = "${LARDER_TEST_AMQP_URL%/*}/$vhost"

[auth]
hs256-secret-base64 = "$(head -c 32 /dev/urandom | base64 -w0)"

[log]
format = "json"
EOF
    )
    env "${overrides[@]}" "$bin_dir/ingest-api" --config "$config" --mode migrate >/dev/null

    local names=() i
    for ((i = 1; i <= apis; i++)); do names+=("ingest-api-$i"); done
    for ((i = 1; i <= chunkers; i++)); do names+=("chunker-worker-$i"); done
    for ((i = 1; i <= compressors; i++)); do names+=("compressor-worker-$i"); done
    names+=(gc-scheduler)

    local api_urls=() pids=() listen_port pid args
    for name in "${names[@]}"; do
        pick_port listen_port
        args=(--config "$config" --listen "$HOST:$listen_port")
        [[ $name == ingest-api-* ]] && args+=(--mode api) && api_urls+=("http://$HOST:$listen_port")
        env "${overrides[@]}" "$bin_dir/${name%-[0-9]*}" "${args[@]}" >"$DIR/logs/$name.log" 2>&1 &
        pid=$!
        echo "$name $pid" >>"$DIR/pids"
        pids+=("$name=$pid")
    done
    local entry message waited
    for entry in "${pids[@]}"; do
        name=${entry%=*}
        pid=${entry#*=}
        message=$(ready_message "$name")
        waited=0
        until grep -q "\"message\":\"$message\"" "$DIR/logs/$name.log"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                tail -n 20 "$DIR/logs/$name.log" >&2 || true
                die "$name exited while starting"
            fi
            ((waited < READY_TIMEOUT * 10)) || die "$name was not ready within $READY_TIMEOUT s"
            sleep 0.1
            waited=$((waited + 1))
        done
    done
    {
        printf 'export LARDER_CONFIG=%q\n' "$config"
        printf 'export LARDER_CLUSTER_API_URLS=%q\n' "${api_urls[*]}"
        printf 'export LARDER_CLUSTER_PIDS=%q\n' "${pids[*]}"
    } >"$DIR/env"
    say "running: ${pids[*]}"
    say "API servers: ${api_urls[*]}; config $config; logs in $DIR/logs"
}

stop() {
    [[ -f $DIR/pids ]] || die "$DIR holds no cluster"
    local name pid
    while read -r name pid; do
        stop_pid "$pid"
    done <"$DIR/pids"
    rm -f "$DIR/pids" "$DIR/env"
    if [[ -f $DIR/own-services ]]; then
        bash "$repo/ops/services.sh" stop "$(cat "$DIR/own-services")"
        rm -f "$DIR/own-services"
    fi
    say "stopped"
}

status() {
    [[ -f $DIR/pids ]] || die "$DIR holds no cluster"
    local name pid state
    while read -r name pid; do
        state=stopped
        kill -0 "$pid" 2>/dev/null && state=running
        printf '%-22s %8s  %s\n' "$name" "$pid" "$state"
    done <"$DIR/pids"
}

case $command in
    start) start "$@" ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
