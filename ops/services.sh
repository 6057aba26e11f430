#!/usr/bin/env bash
# Starts and stops the real services Larder's tests run against, as plain
# local processes: RabbitMQ, PostgreSQL and a single-node Garage (S3), each
# reachable over plain TCP and over TLS with a throwaway CA minted here.
#
#   ops/services.sh start DIR [rabbitmq|postgres|garage ...]   (default: all three)
#   ops/services.sh stop DIR
#   ops/services.sh status DIR
#   ops/services.sh {stop,start,restart}-{rabbitmq,postgres,garage} DIR
#   ops/services.sh rabbitmqctl DIR ARGS...   (e.g. list_queues, close_all_connections)
#
# `start` keeps every service's data and log under DIR (which must not hold a
# running set already), binds everything to 127.0.0.1 on a block of free ports
# picked at random (so two runs on one machine do not collide), waits until
# each service really answers, and writes DIR/env: `export` lines with the
# LARDER_TEST_* variables the tests read (see tests/src/services.rs; DIR/vars
# holds the same as plain NAME=VALUE lines).
#
# TLS: `start` mints a throwaway CA in DIR/tls (openssl, EC P-256, valid for
# 30 days), a server certificate it signed for 127.0.0.1 and localhost, and
# a second CA that signed nothing (for tests of a wrong CA). PostgreSQL runs
# with `ssl = on` (one port for plain and TLS connections: the client
# chooses), RabbitMQ gets an AMQPS listener beside its plain one, and nginx
# terminates TLS in front of Garage's S3 port (Garage speaks plain HTTP).
#
# `stop` stops what `start`
# started, by pid, then kills any straggler: every process started here
# carries LARDER_SERVICES_MARK=DIR in its environment, which is how the Erlang
# VM's epmd and helpers are found without matching on names. It also stops
# the sets in DIR/private/*/ (a killed fault test's own services).
#
# The single-service subcommands are for fault tests: a service comes back on
# the same port with the same data. Run `ops/install.sh` first.
set -euo pipefail

export PATH="$HOME/.cargo/bin:$PATH"

readonly HOST=127.0.0.1
readonly ALL_SERVICES=(rabbitmq postgres garage)
readonly RABBITMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
readonly S3_REGION=garage
readonly S3_BUCKET=larder-test
# How long a service may take to answer before `start` gives up. Generous:
# the suite may be compiling on both cores while the services boot.
readonly START_TIMEOUT=${LARDER_SERVICES_START_TIMEOUT:-120}
readonly STOP_TIMEOUT=30

say() { printf 'services: %s\n' "$*" >&2; }

die() {
    say "error: $*"
    exit 1
}

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
}

# Prints the last lines of a service's log after a failure.
show_log() {
    local file=$1
    if [[ -s $file ]]; then
        say "last lines of $file:"
        tail -n 30 "$file" | sed 's/^/    /' >&2
    else
        say "($file is empty or missing)"
    fi
}

# Sets AS_USER to the command prefix that runs a command as user $1 when we
# are root (PostgreSQL refuses to run as root, RabbitMQ's files belong to
# `rabbitmq`), and to nothing otherwise.
as_user() {
    if [[ $EUID -eq 0 ]]; then
        AS_USER=(runuser -u "$1" --)
    else
        AS_USER=()
    fi
}

# Appends `export NAME=VALUE` to DIR/env (for shells) and `NAME=VALUE` to
# DIR/vars (for programs: unquoted, one a line), and exports it here too. The
# files grow as each service is configured, so `stop` can clean up after a
# `start` that failed halfway.
record() {
    local name=$1 value=$2
    printf 'export %s=%q\n' "$name" "$value" >>"$DIR/env"
    printf '%s=%s\n' "$name" "$value" >>"$DIR/vars"
    export "$name=$value"
}

load_env() {
    [[ -f $DIR/env ]] || die "$DIR/env not found: no services were started in $DIR"
    # shellcheck source=/dev/null
    source "$DIR/env"
}

random_hex() {
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}

# --- ports -------------------------------------------------------------------

port_in_use() {
    local port=$1
    if (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; then
        return 0
    fi
    # Also catch a port bound without listening (e.g. a client's local port).
    if command -v ss >/dev/null && [[ -n $(ss -Htan "sport = :$port" 2>/dev/null) ]]; then
        return 0
    fi
    return 1
}

# Picks a block of 20 consecutive free ports below the kernel's ephemeral
# range and sets PORT_BASE. Offsets: 0 AMQP, 1 Erlang distribution, 2 epmd,
# 3 PostgreSQL, 4 S3, 5 Garage RPC, 6 Garage admin, 7 AMQPS, 8 S3 over HTTPS
# (nginx), 10-19 rabbitmqctl's own distribution ports.
allocate_ports() {
    local attempt base offset busy
    for attempt in $(seq 50); do
        base=$((20000 + 20 * (RANDOM % 600)))
        busy=
        for offset in $(seq 0 19); do
            if port_in_use $((base + offset)); then
                busy=1
                break
            fi
        done
        if [[ -z $busy ]]; then
            PORT_BASE=$base
            return 0
        fi
    done
    die "found no block of 20 free ports in 20000-32000 after $attempt attempts"
}

# --- readiness probes ----------------------------------------------------------

# True when an AMQP 0-9-1 server on PORT answers the protocol header with a
# method frame (Connection.Start): the broker itself is up, not just a socket.
amqp_answers() {
    local port=$1
    (
        export LC_ALL=C
        exec 3<>"/dev/tcp/$HOST/$port"
        printf 'AMQP\x00\x00\x09\x01' >&3
        IFS= read -r -N 1 -t 5 frame_type <&3
        [[ $frame_type == $'\x01' ]]
    ) 2>/dev/null
}

# Prints the HTTP status code of `GET PATH` on PORT, or nothing.
http_status() {
    local port=$1 path=$2
    (
        exec 3<>"/dev/tcp/$HOST/$port"
        printf 'GET %s HTTP/1.0\r\nHost: %s:%s\r\n\r\n' "$path" "$HOST" "$port" >&3
        IFS=' ' read -r -t 5 _ status _ <&3
        printf '%s' "$status"
    ) 2>/dev/null || true
}

# True when a TLS server on PORT completes a handshake with a certificate
# the throwaway CA signed for 127.0.0.1.
tls_answers() {
    local port=$1
    openssl s_client -quiet -no_ign_eof -verify_return_error -verify_ip "$HOST" \
        -CAfile "$LARDER_TEST_TLS_CA_FILE" -connect "$HOST:$port" </dev/null >/dev/null 2>&1
}

# wait_until DESCRIPTION LOG PID CHECK...: polls CHECK until it succeeds; fails
# with LOG's tail when PID dies or START_TIMEOUT passes.
wait_until() {
    local description=$1 log=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            show_log "$log"
            die "$description: the process exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            show_log "$log"
            die "$description: not ready after $START_TIMEOUT s"
        fi
        sleep 0.2
    done
}

# --- TLS -----------------------------------------------------------------------

# Mints the throwaway CA, the server certificate every service presents and
# an unrelated CA, in DIR/tls. EC P-256 keys: generated in milliseconds.
configure_tls() {
    local dir=$DIR/tls
    command -v openssl >/dev/null || die "openssl not found: run ops/install.sh"
    mkdir -p "$dir"
    record LARDER_TEST_TLS_CA_FILE "$dir/ca.pem"
    record LARDER_TEST_TLS_OTHER_CA_FILE "$dir/other-ca.pem"
    record LARDER_TEST_TLS_CERT_FILE "$dir/server.pem"
    record LARDER_TEST_TLS_KEY_FILE "$dir/server.key"
    if ! mint_certificates "$dir" >"$dir/openssl.log" 2>&1; then
        show_log "$dir/openssl.log"
        die "minting the throwaway CA and certificates failed"
    fi
}

# Steps chained with && (see provision_garage). Keys are private to root;
# each service gets its own copy (install_server_key).
mint_certificates() (
    dir=$1
    key_options=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    ca_extensions=(-addext basicConstraints=critical,CA:TRUE
        -addext keyUsage=critical,keyCertSign,cRLSign)
    umask 077
    openssl req -x509 "${key_options[@]}" -days 30 "${ca_extensions[@]}" \
        -subj "/CN=Larder throwaway test CA $(random_hex 4)" \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" &&
        openssl req -x509 "${key_options[@]}" -days 30 "${ca_extensions[@]}" \
            -subj "/CN=Larder unrelated test CA $(random_hex 4)" \
            -keyout "$dir/other-ca.key" -out "$dir/other-ca.pem" &&
        openssl req -new "${key_options[@]}" -subj "/CN=localhost" \
            -keyout "$dir/server.key" -out "$dir/server.csr" &&
        printf '%s\n' basicConstraints=critical,CA:FALSE keyUsage=critical,digitalSignature \
            extendedKeyUsage=serverAuth "subjectAltName=DNS:localhost,IP:$HOST" >"$dir/server.ext" &&
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -set_serial "0x$(random_hex 8)" -days 30 -extfile "$dir/server.ext" \
            -out "$dir/server.pem" &&
        chmod 644 "$dir/ca.pem" "$dir/other-ca.pem" "$dir/server.pem"
)

# Copies the server's key to FILE, readable by USER alone: PostgreSQL refuses
# a key others may read, and RabbitMQ reads its key as its own user.
install_server_key() {
    local file=$1 user=$2
    install -m 600 "$LARDER_TEST_TLS_KEY_FILE" "$file"
    [[ $EUID -ne 0 ]] || chown "$user:$user" "$file"
}

# --- RabbitMQ ------------------------------------------------------------------

configure_rabbitmq() {
    local dir=$DIR/rabbitmq
    mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
    echo '[].' >"$dir/enabled_plugins"
    local port=$((PORT_BASE + 0)) tls_port=$((PORT_BASE + 7))
    # One log, the node's standard output, so that a failure shows all of it.
    # The AMQPS listener asks clients for no certificate: they log in with a
    # password, as on hosted brokers.
    cat >"$dir/rabbitmq.conf" <<EOF
log.console = true
log.console.level = info
log.console.use_colors = off
log.file = false
listeners.ssl.1 = $HOST:$tls_port
ssl_options.cacertfile = $LARDER_TEST_TLS_CA_FILE
ssl_options.certfile = $LARDER_TEST_TLS_CERT_FILE
ssl_options.keyfile = $dir/server.key
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
EOF
    : >"$dir/rabbitmq-env.conf"
    # Started as root, the broker runs as `rabbitmq`, which must own its data
    # (or it dies with failed_to_create_feature_flags_file_directory).
    [[ $EUID -ne 0 ]] || chown -R rabbitmq:rabbitmq "$dir"
    install_server_key "$dir/server.key" rabbitmq

    record LARDER_TEST_AMQP_URL "amqp://guest:guest@$HOST:$port/%2f"
    record LARDER_TEST_AMQPS_URL "amqps://guest:guest@$HOST:$tls_port/%2f"
    record LARDER_TEST_RABBITMQ_PORT "$port"
    record LARDER_TEST_RABBITMQ_TLS_PORT "$tls_port"
    record LARDER_TEST_RABBITMQ_NODE "larder-$port@localhost"
    record LARDER_TEST_RABBITMQ_DIST_PORT $((PORT_BASE + 1))
    record LARDER_TEST_RABBITMQ_EPMD_PORT $((PORT_BASE + 2))
    record LARDER_TEST_RABBITMQ_CTL_PORTS "$((PORT_BASE + 10))-$((PORT_BASE + 19))"
    record LARDER_TEST_RABBITMQ_PID_FILE "$dir/rabbitmq.pid"
    record LARDER_TEST_RABBITMQ_LOG "$dir/rabbitmq.log"
}

# Sets RABBITMQ_PREFIX to the prefix of every RabbitMQ command: as the
# `rabbitmq` user, with our node, our ports and our files. A private HOME gives
# the node and rabbitmqctl their own Erlang cookie, and a private epmd port
# keeps our node out of any other run's (or the system's) epmd.
rabbitmq_prefix() {
    local dir=$DIR/rabbitmq
    as_user rabbitmq
    RABBITMQ_PREFIX=(
        "${AS_USER[@]}" env
        LARDER_SERVICES_MARK="$DIR"
        HOME="$dir/home"
        ERL_EPMD_PORT="$LARDER_TEST_RABBITMQ_EPMD_PORT"
        RABBITMQ_NODENAME="$LARDER_TEST_RABBITMQ_NODE"
        RABBITMQ_NODE_IP_ADDRESS="$HOST"
        RABBITMQ_NODE_PORT="$LARDER_TEST_RABBITMQ_PORT"
        RABBITMQ_DIST_PORT="$LARDER_TEST_RABBITMQ_DIST_PORT"
        RABBITMQ_CTL_DIST_PORT_MIN="${LARDER_TEST_RABBITMQ_CTL_PORTS%-*}"
        RABBITMQ_CTL_DIST_PORT_MAX="${LARDER_TEST_RABBITMQ_CTL_PORTS#*-}"
        RABBITMQ_MNESIA_BASE="$dir/mnesia"
        RABBITMQ_LOG_BASE="$dir/log"
        RABBITMQ_PID_FILE="$LARDER_TEST_RABBITMQ_PID_FILE"
        RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
        RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
        RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
    )
}

rabbitmqctl() {
    rabbitmq_prefix
    "${RABBITMQ_PREFIX[@]}" "$RABBITMQ_BIN/rabbitmqctl" -q -n "$LARDER_TEST_RABBITMQ_NODE" "$@"
}

launch_rabbitmq() {
    local dir=$DIR/rabbitmq
    rabbitmq_prefix
    rm -f "$LARDER_TEST_RABBITMQ_PID_FILE"
    # setsid: the broker is no child of a test's process group, so a test that
    # restarts it and is then killed by nextest does not take it along.
    (cd "$dir" && exec setsid "${RABBITMQ_PREFIX[@]}" "$RABBITMQ_BIN/rabbitmq-server") \
        >>"$LARDER_TEST_RABBITMQ_LOG" 2>&1 </dev/null &
    RABBITMQ_LAUNCHER=$!
}

await_rabbitmq() {
    # The listeners open at the end of boot, so an AMQP answer means ready.
    wait_until "RabbitMQ on port $LARDER_TEST_RABBITMQ_PORT" "$LARDER_TEST_RABBITMQ_LOG" \
        "$RABBITMQ_LAUNCHER" amqp_answers "$LARDER_TEST_RABBITMQ_PORT"
    wait_until "RabbitMQ's AMQPS listener on port $LARDER_TEST_RABBITMQ_TLS_PORT" \
        "$LARDER_TEST_RABBITMQ_LOG" "$RABBITMQ_LAUNCHER" tls_answers "$LARDER_TEST_RABBITMQ_TLS_PORT"
    # `stop` needs the VM's pid, which the broker writes early in its boot.
    [[ -s $LARDER_TEST_RABBITMQ_PID_FILE ]] || die "RabbitMQ: no pid in $LARDER_TEST_RABBITMQ_PID_FILE"
}

start_rabbitmq() {
    launch_rabbitmq
    await_rabbitmq
}

stop_rabbitmq() {
    [[ -n ${LARDER_TEST_RABBITMQ_PID_FILE:-} ]] || return 0
    local pid_file=$LARDER_TEST_RABBITMQ_PID_FILE pid=
    [[ -s $pid_file ]] && pid=$(<"$pid_file")
    if [[ -n $pid ]] && started_here "$pid"; then
        # SIGTERM to the Erlang VM is a clean shutdown (init:stop): durable
        # queues and persistent messages survive, as with `rabbitmqctl stop`,
        # without the CLI's own VM start-up (seconds on a busy machine).
        kill -TERM "$pid" 2>/dev/null || true
        wait_for_exit "$pid"
    fi
    rm -f "$pid_file"
}

# --- PostgreSQL ----------------------------------------------------------------

postgres_bin_dir() {
    local dirs
    dirs=$(compgen -G '/usr/lib/postgresql/*/bin' | sort -V) || true
    [[ -n $dirs ]] || die "no PostgreSQL server under /usr/lib/postgresql: run ops/install.sh"
    tail -n 1 <<<"$dirs"
}

configure_postgres() {
    local dir=$DIR/postgres bin
    bin=$(postgres_bin_dir)
    mkdir -p "$dir"
    [[ $EUID -ne 0 ]] || chown postgres:postgres "$dir"
    as_user postgres
    local port=$((PORT_BASE + 3))
    record LARDER_TEST_POSTGRES_URL "postgres://postgres@$HOST:$port/postgres"
    # The same server over TLS, its certificate checked against the CA and
    # the host name: the strictest mode clients have.
    record LARDER_TEST_POSTGRES_TLS_URL \
        "postgres://postgres@$HOST:$port/postgres?sslmode=verify-full&sslrootcert=$LARDER_TEST_TLS_CA_FILE"
    record LARDER_TEST_POSTGRES_PORT "$port"
    record LARDER_TEST_POSTGRES_BIN_DIR "$bin"
    record LARDER_TEST_POSTGRES_DATA_DIR "$dir/data"
    record LARDER_TEST_POSTGRES_LOG "$dir/postgres.log"

    if ! "${AS_USER[@]}" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust \
        --encoding=UTF8 --no-sync >"$dir/initdb.log" 2>&1; then
        show_log "$dir/initdb.log"
        die "PostgreSQL: initdb failed"
    fi
    # `ssl = on` reads server.crt and server.key from the data directory.
    install_server_key "$dir/data/server.key" postgres
    install -m 644 "$LARDER_TEST_TLS_CERT_FILE" "$dir/data/server.crt"
    # Settings live in the cluster's own config so that a restart keeps them.
    # Durability is traded for speed: the cluster is thrown away after the run,
    # and a restart by pg_ctl is clean, so nothing relies on fsync.
    "${AS_USER[@]}" tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF

# ops/services.sh: a private, throwaway test cluster.
listen_addresses = '$HOST'
port = $port
unix_socket_directories = '$dir'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
# TLS beside plain connections on the same port: the client chooses.
ssl = on
EOF
}

# Sets PG_CTL to the pg_ctl command for our cluster, as the `postgres` user.
pg_ctl_command() {
    as_user postgres
    PG_CTL=("${AS_USER[@]}" env LARDER_SERVICES_MARK="$DIR"
        "$LARDER_TEST_POSTGRES_BIN_DIR/pg_ctl" -D "$LARDER_TEST_POSTGRES_DATA_DIR")
}

start_postgres() {
    pg_ctl_command
    # pg_ctl -w returns once the server accepts connections; setsid keeps the
    # server out of the caller's process group (see launch_rabbitmq).
    if ! setsid -w "${PG_CTL[@]}" -l "$LARDER_TEST_POSTGRES_LOG" -w -t "$START_TIMEOUT" start \
        >>"$DIR/postgres/pg_ctl.log" 2>&1 </dev/null; then
        show_log "$DIR/postgres/pg_ctl.log"
        show_log "$LARDER_TEST_POSTGRES_LOG"
        die "PostgreSQL on port $LARDER_TEST_POSTGRES_PORT did not start"
    fi
    if ! "$LARDER_TEST_POSTGRES_BIN_DIR/pg_isready" -q -h "$HOST" -p "$LARDER_TEST_POSTGRES_PORT" -U postgres; then
        show_log "$LARDER_TEST_POSTGRES_LOG"
        die "PostgreSQL: pg_isready fails on port $LARDER_TEST_POSTGRES_PORT"
    fi
}

stop_postgres() {
    [[ -n ${LARDER_TEST_POSTGRES_DATA_DIR:-} ]] || return 0
    local pid_file=$LARDER_TEST_POSTGRES_DATA_DIR/postmaster.pid pid=
    [[ -s $pid_file ]] && pid=$(head -n 1 "$pid_file")
    [[ -n $pid ]] && started_here "$pid" || return 0
    # Fast shutdown: open connections are cut, as a fault test expects.
    pg_ctl_command
    if ! "${PG_CTL[@]}" -m fast -w -t "$STOP_TIMEOUT" stop >>"$DIR/postgres/pg_ctl.log" 2>&1; then
        say "PostgreSQL did not stop cleanly; killing pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait_for_exit "$pid"
}

# --- Garage --------------------------------------------------------------------

configure_garage() {
    local dir=$DIR/garage
    command -v garage >/dev/null || die "garage not found: run ops/install.sh"
    mkdir -p "$dir/meta" "$dir/data"
    local s3_port=$((PORT_BASE + 4)) rpc_port=$((PORT_BASE + 5)) admin_port=$((PORT_BASE + 6))
    local admin_token
    admin_token=$(random_hex 32)
    (
        umask 077
        cat >"$dir/garage.toml" <<EOF
# ops/services.sh: a private, throwaway single-node Garage.
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1
# Larder's packs are zstd frames already, and its staged NARs are read back
# within seconds and deleted: compressing them again only costs CPU, a
# quarter of Garage's in a distributed push (issue #14).
compression_level = "none"
rpc_bind_addr = "$HOST:$rpc_port"
rpc_public_addr = "$HOST:$rpc_port"
rpc_secret = "$(random_hex 32)"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "$HOST:$s3_port"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "$HOST:$admin_port"
admin_token = "$admin_token"
EOF
    )
    record LARDER_TEST_S3_ENDPOINT "http://$HOST:$s3_port"
    record LARDER_TEST_S3_HTTPS_ENDPOINT "https://$HOST:$((PORT_BASE + 8))"
    record LARDER_TEST_S3_REGION "$S3_REGION"
    record LARDER_TEST_S3_BUCKET "$S3_BUCKET"
    # Garage key ids are "GK" and 24 hex digits; secrets are 64 hex digits.
    record LARDER_TEST_S3_ACCESS_KEY_ID "GK$(random_hex 12)"
    record LARDER_TEST_S3_SECRET_ACCESS_KEY "$(random_hex 32)"
    record LARDER_TEST_GARAGE_CONFIG "$dir/garage.toml"
    record LARDER_TEST_GARAGE_PID_FILE "$dir/garage.pid"
    record LARDER_TEST_GARAGE_LOG "$dir/garage.log"
    record LARDER_TEST_GARAGE_RPC_PORT "$rpc_port"
    record LARDER_TEST_GARAGE_ADMIN_URL "http://$HOST:$admin_port"
    record LARDER_TEST_GARAGE_ADMIN_TOKEN "$admin_token"
}

garage_cli() {
    garage -c "$LARDER_TEST_GARAGE_CONFIG" "$@"
}

launch_garage() {
    (exec setsid env LARDER_SERVICES_MARK="$DIR" RUST_LOG="${GARAGE_LOG_LEVEL:-garage=info}" \
        garage -c "$LARDER_TEST_GARAGE_CONFIG" server) \
        >>"$LARDER_TEST_GARAGE_LOG" 2>&1 </dev/null &
    echo $! >"$LARDER_TEST_GARAGE_PID_FILE"
}

garage_rpc_answers() {
    garage_cli status >/dev/null 2>&1
}

garage_healthy() {
    [[ $(http_status "${LARDER_TEST_GARAGE_ADMIN_URL##*:}" /health) == 200 ]]
}

s3_answers() {
    [[ -n $(http_status "${LARDER_TEST_S3_ENDPOINT##*:}" /) ]]
}

# Waits for a launched Garage to serve S3; on its first start, also gives it a
# layout, the test bucket and the test key.
await_garage() {
    local pid log=$LARDER_TEST_GARAGE_LOG
    pid=$(<"$LARDER_TEST_GARAGE_PID_FILE")
    wait_until "Garage RPC on port $LARDER_TEST_GARAGE_RPC_PORT" "$log" "$pid" garage_rpc_answers
    if [[ ! -f $DIR/garage/provisioned ]]; then
        if ! provision_garage >"$DIR/garage/provision.log" 2>&1; then
            show_log "$DIR/garage/provision.log"
            show_log "$log"
            die "Garage: setting up the layout, bucket and key failed"
        fi
        touch "$DIR/garage/provisioned"
    fi
    wait_until "Garage health at $LARDER_TEST_GARAGE_ADMIN_URL/health" "$log" "$pid" garage_healthy
    wait_until "Garage S3 at $LARDER_TEST_S3_ENDPOINT" "$log" "$pid" s3_answers
}

# Steps chained with &&: called from an `if`, `set -e` would not stop a
# failed step. A subshell keeps `set -x` (the log's trace) to itself.
provision_garage() (
    set -x
    node_id=$(garage_cli node id -q) &&
        garage_cli layout assign -z dc1 -c 1G "${node_id:0:16}" &&
        garage_cli layout apply --version 1 &&
        garage_cli bucket create "$LARDER_TEST_S3_BUCKET" &&
        garage_cli key import --yes -n larder-test \
            "$LARDER_TEST_S3_ACCESS_KEY_ID" "$LARDER_TEST_S3_SECRET_ACCESS_KEY" &&
        garage_cli bucket allow --read --write --owner "$LARDER_TEST_S3_BUCKET" --key larder-test
)

start_garage() {
    launch_garage
    await_garage
}

stop_garage() {
    stop_pid_file "${LARDER_TEST_GARAGE_PID_FILE:-}"
    [[ -z ${LARDER_TEST_GARAGE_PID_FILE:-} ]] || rm -f "$LARDER_TEST_GARAGE_PID_FILE"
}

# --- S3 over HTTPS: nginx in front of Garage -------------------------------------

# The terminator lives as long as the whole set: a fault test's stop-garage
# leaves it answering 502, as a load balancer in front of a dead S3 would.
configure_s3_tls() {
    local dir=$DIR/s3-tls
    command -v nginx >/dev/null || die "nginx not found: run ops/install.sh"
    mkdir -p "$dir/tmp"
    record LARDER_TEST_S3_TLS_PID_FILE "$dir/nginx.pid"
    record LARDER_TEST_S3_TLS_LOG "$dir/error.log"
    # Bodies stream both ways (no buffering, no size limit); Host goes
    # through unchanged, since S3 signatures cover it.
    cat >"$dir/nginx.conf" <<EOF
# ops/services.sh: TLS in front of a throwaway Garage's S3 port.
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
    worker_connections 512;
}
http {
    access_log off;
    client_body_temp_path $dir/tmp/client_body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen $HOST:${LARDER_TEST_S3_HTTPS_ENDPOINT##*:} ssl;
        ssl_certificate $LARDER_TEST_TLS_CERT_FILE;
        ssl_certificate_key $LARDER_TEST_TLS_KEY_FILE;
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        location / {
            proxy_pass $LARDER_TEST_S3_ENDPOINT;
            proxy_http_version 1.1;
            proxy_set_header Host \$http_host;
            proxy_read_timeout 300s;
        }
    }
}
EOF
}

launch_s3_tls() {
    local dir=$DIR/s3-tls
    (exec setsid env LARDER_SERVICES_MARK="$DIR" \
        nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log") \
        >>"$dir/stdout.log" 2>&1 </dev/null &
    S3_TLS_LAUNCHER=$!
}

await_s3_tls() {
    wait_until "nginx (S3 over HTTPS) at $LARDER_TEST_S3_HTTPS_ENDPOINT" "$LARDER_TEST_S3_TLS_LOG" \
        "$S3_TLS_LAUNCHER" tls_answers "${LARDER_TEST_S3_HTTPS_ENDPOINT##*:}"
}

stop_s3_tls() {
    # SIGTERM: nginx's fast shutdown; nginx removes its pid file.
    stop_pid_file "${LARDER_TEST_S3_TLS_PID_FILE:-}"
}

# --- stopping --------------------------------------------------------------------

# Whether PID is a running process started for DIR, not merely a pid a pid
# file names: a pid file outlives its process, and with pid_max at 32768 and
# the suite starting thousands of processes, its pid is soon another's (a
# test's Nix build, say), which a bare `kill` would then stop or kill. Each
# service carries the mark in its environment, except nginx, which
# overwrites that area with its process title: nginx is known by its prefix
# (-p) in that title instead. A zombie has neither.
started_here() {
    grep -qzxF "LARDER_SERVICES_MARK=$DIR" "/proc/$1/environ" 2>/dev/null && return 0
    local title
    title=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $title == *" -p $DIR/s3-tls "* ]]
}

# Stops the process whose pid FILE holds (none if FILE is unset, empty or
# absent): SIGTERM, then wait_for_exit.
stop_pid_file() {
    local file=$1 pid
    [[ -n $file && -s $file ]] || return 0
    pid=$(<"$file")
    if started_here "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_for_exit "$pid"
    fi
}

# Waits up to STOP_TIMEOUT for PID to exit, then kills it.
wait_for_exit() {
    local pid=$1 deadline=$((SECONDS + STOP_TIMEOUT))
    while started_here "$pid"; do
        if ((SECONDS >= deadline)); then
            say "pid $pid still running after $STOP_TIMEOUT s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
            return 0
        fi
        sleep 0.1
    done
}

# Pids of the processes started for DIR that are still running.
marked_pids() {
    local environ pid
    # One grep over every process's environment (unreadable ones are skipped).
    grep -lzxF "LARDER_SERVICES_MARK=$DIR" /proc/[0-9]*/environ 2>/dev/null |
        while IFS= read -r environ; do
            pid=${environ#/proc/}
            pid=${pid%/environ}
            [[ $pid == "$$" ]] || echo "$pid"
        done
}

kill_stragglers() {
    local pids
    pids=$(marked_pids)
    [[ -n $pids ]] || return 0
    # shellcheck disable=SC2086 # one pid a word
    kill -TERM $pids 2>/dev/null || true
    local deadline=$((SECONDS + 5))
    while [[ -n $(marked_pids) ]] && ((SECONDS < deadline)); do
        sleep 0.1
    done
    pids=$(marked_pids)
    # shellcheck disable=SC2086
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

# The three stop in parallel (each takes a second or two). Each runs even when
# another failed: stopping is best effort, and the straggler sweep at the end
# catches what the clean stops missed.
stop_all() {
    # First the private sets fault tests started inside DIR
    # (tests::services::PrivateServices) and could not stop, being killed.
    local private
    for private in "$DIR"/private/*/; do
        [[ -f $private/env ]] || continue
        bash "${BASH_SOURCE[0]}" stop "$private" || say "stopping $private failed"
    done
    local stoppers=()
    stop_garage || say "stopping Garage failed" &
    stoppers+=($!)
    stop_postgres || say "stopping PostgreSQL failed" &
    stoppers+=($!)
    stop_rabbitmq || say "stopping RabbitMQ failed" &
    stoppers+=($!)
    stop_s3_tls || say "stopping nginx (S3 over HTTPS) failed" &
    stoppers+=($!)
    # Not a bare `wait`: after a failed start, the launched services are
    # children of this shell too.
    wait "${stoppers[@]}"
    # epmd, and anything else an abnormal exit left behind.
    kill_stragglers || say "killing stragglers failed"
}

# --- commands --------------------------------------------------------------------

start_all() {
    local services=("$@") service
    ((${#services[@]} > 0)) || services=("${ALL_SERVICES[@]}")
    for service in "${services[@]}"; do
        [[ " ${ALL_SERVICES[*]} " == *" $service "* ]] || die "unknown service '$service'"
    done
    [[ ! -e $DIR/env ]] || die "$DIR/env exists: services were already started there"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    # The service users must reach their directories inside DIR.
    chmod 755 "$DIR"
    if [[ $EUID -eq 0 ]] && ! runuser -u postgres -- test -x "$DIR"; then
        die "$DIR is not reachable by the postgres and rabbitmq users: use a directory under /tmp"
    fi
    : >"$DIR/env"
    : >"$DIR/vars"
    # A start that fails halfway stops what it had started.
    trap 'status=$?; if ((status != 0)); then say "start failed; stopping what was started"; stop_all; fi' EXIT

    local started=$SECONDS
    allocate_ports
    record LARDER_TEST_SERVICES_DIR "$DIR"
    record LARDER_TEST_SERVICES "${services[*]}"
    configure_tls
    # RabbitMQ boots slowest: launch it first and configure the others meanwhile.
    if [[ " ${services[*]} " == *" rabbitmq "* ]]; then
        configure_rabbitmq
        launch_rabbitmq
    fi
    if [[ " ${services[*]} " == *" garage "* ]]; then
        configure_garage
        launch_garage
        configure_s3_tls
        launch_s3_tls
    fi
    if [[ " ${services[*]} " == *" postgres "* ]]; then
        configure_postgres
        start_postgres
    fi
    if [[ " ${services[*]} " == *" garage "* ]]; then
        await_garage
        await_s3_tls
    fi
    [[ " ${services[*]} " != *" rabbitmq "* ]] || await_rabbitmq
    trap - EXIT
    say "${services[*]} ready in $((SECONDS - started)) s; environment in $DIR/env"
}

status_all() {
    local service
    for service in $LARDER_TEST_SERVICES; do
        case $service in
        rabbitmq) amqp_answers "$LARDER_TEST_RABBITMQ_PORT" && echo "rabbitmq: up" || echo "rabbitmq: down" ;;
        postgres)
            "$LARDER_TEST_POSTGRES_BIN_DIR/pg_isready" -q -h "$HOST" -p "$LARDER_TEST_POSTGRES_PORT" &&
                echo "postgres: up" || echo "postgres: down"
            ;;
        garage) garage_healthy && echo "garage: up" || echo "garage: down" ;;
        esac
    done
}

# Only DIR's own settings may count. A test that starts or stops its private
# set runs this script with the shared set's variables in its environment;
# were they kept, stopping a RabbitMQ-only private set would stop the shared
# Garage and PostgreSQL, whose variables that set's env file never sets.
forget_inherited_settings() {
    local inherited
    for inherited in $(compgen -e | grep '^LARDER_TEST_' || true); do
        unset "$inherited"
    done
}

main() {
    (($# >= 2)) || usage
    forget_inherited_settings
    local command=$1 dir_argument=$2
    DIR=$2
    shift 2
    case $command in
    start)
        start_all "$@"
        return
        ;;
    stop | status | stop-* | start-* | restart-*) (($# == 0)) || usage ;;
    rabbitmqctl) ;;
    *) usage ;;
    esac
    DIR=$(cd "$DIR" 2>/dev/null && pwd) || die "no such directory: $dir_argument"
    load_env
    case $command in
    stop) stop_all ;;
    status) status_all ;;
    rabbitmqctl) rabbitmqctl "$@" ;;
    stop-rabbitmq) stop_rabbitmq ;;
    start-rabbitmq) start_rabbitmq ;;
    restart-rabbitmq) stop_rabbitmq && start_rabbitmq ;;
    stop-postgres) stop_postgres ;;
    start-postgres) start_postgres ;;
    restart-postgres) stop_postgres && start_postgres ;;
    stop-garage) stop_garage ;;
    start-garage) start_garage ;;
    restart-garage) stop_garage && start_garage ;;
    *) usage ;;
    esac
}

main "$@"
