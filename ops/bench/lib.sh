# Shell functions and settings shared by Larder's benchmarks (ops/bench-*.sh)
# and ops/cluster.sh. Source it after setting `bench_name` (the prefix of
# every message).

export PATH="$HOME/.cargo/bin:$PATH"
# Builds go where ops/test.sh puts them, outside the checkout.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/larder/target}
# The address servers are started on.
readonly HOST=127.0.0.1

say() { printf '%s: %s\n' "$bench_name" "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}

# Prints the script's header comment (its usage) and exits with status 2.
usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
    exit 2
}

# Installs the Debian packages of the commands named as COMMAND:PACKAGE
# arguments that are missing.
install_tools() {
    local missing=() tool package
    for tool in "$@"; do
        package=${tool#*:}
        command -v "${tool%%:*}" >/dev/null || missing+=("$package")
    done
    ((${#missing[@]})) || return 0
    [[ $EUID -eq 0 ]] || die "missing ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    say "installing ${missing[*]}"
    # apt-install.sh keeps the packages' services (nginx's on port 80) from starting.
    local status=0
    { apt-get update -qq \
        && bash "$(dirname "${BASH_SOURCE[0]}")/../apt-install.sh" "${missing[@]}" >/dev/null; } || status=$?
    ((status == 0)) || die "apt-get install ${missing[*]} failed"
}

# Stops one process started here: TERM, up to 10 s, then KILL.
stop_pid() {
    local pid=$1 waited=0
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Builds PACKAGES' BINARIES in release mode, unless the script's $build is
# 0, and sets $bin to where they are; fails if one is missing.
#   release_binaries PACKAGE... -- BINARY...
release_binaries() {
    local packages=() binaries=() binary
    while (($#)) && [[ $1 != -- ]]; do
        packages+=(-p "$1")
        shift
    done
    shift
    binaries=("$@")
    if ((build)); then
        say "building ${binaries[*]} (release)"
        cargo build --release --quiet "${packages[@]}" "${binaries[@]/#/--bin=}"
    fi
    bin=$CARGO_TARGET_DIR/release
    for binary in "${binaries[@]}"; do
        [[ -x $bin/$binary ]] || die "$bin/$binary is missing: run without --no-build"
    done
}

# Makes this run's work directory, $work, and sets what happens on any
# exit: the processes whose pids the variables named here hold are
# stopped, then the script's `before_cleanup` runs if it defines one, then
# $work is removed on success unless the script's $keep is 1 (and named
# otherwise).
#   start_work_dir server_pid nginx_pid
start_work_dir() {
    work=$(mktemp -d "/tmp/larder-$bench_name.XXXXXX")
    pid_variables=("$@")
    trap cleanup_work_dir EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup_work_dir() {
    local status=$? name
    trap - EXIT INT TERM
    for name in "${pid_variables[@]}"; do
        stop_pid "${!name:-}"
    done
    if declare -F before_cleanup >/dev/null; then
        before_cleanup || true
    fi
    if ((status == 0 && keep == 0)); then
        # Some benchmarks leave read-only files (a Nix store).
        chmod -R u+w "$work" 2>/dev/null || true
        rm -rf "$work"
    else
        say "work directory kept: $work"
    fi
    exit "$status"
}

port_in_use() {
    local port=$1
    if (exec 3<>"/dev/tcp/$HOST/$port") 2>/dev/null; then
        return 0
    fi
    command -v ss >/dev/null && [[ -n $(ss -Htan "sport = :$port" 2>/dev/null) ]]
}

# Sets the variable named $1 to a free port in 20000-32000 (below the
# kernel's ephemeral range), picked at random, other than those taken here.
taken_ports=" "
pick_port() {
    local port tries
    for tries in {1..100}; do
        port=$((20000 + RANDOM % 12000))
        if [[ $taken_ports != *" $port "* ]] && ! port_in_use "$port"; then
            taken_ports+="$port "
            printf -v "$1" '%s' "$port"
            return 0
        fi
    done
    die "found no free port in 20000-32000 after $tries tries"
}

# Waits until `curl URL` gets any HTTP answer, while process PID lives.
wait_http() {
    local url=$1 pid=$2 log=$3 waited=0
    until curl -s -o /dev/null "$url"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "the process serving $url exited"
        fi
        ((waited < 300)) || die "$url did not answer within 30 s"
        sleep 0.1
        waited=$((waited + 1))
    done
}

# utime + stime, in clock ticks, of the given pids together.
cpu_ticks() {
    cpu_ticks_by_process | awk -v pids=" $* " 'index(pids, " " $1 " ") { total += $3 } END { print total + 0 }'
}

# utime + stime in clock ticks of every process now running: "pid command
# ticks" lines. Processes a service forks per connection (PostgreSQL's
# backends) are there too.
cpu_ticks_by_process() {
    local stat
    for stat in /proc/[0-9]*/stat; do
        cat "$stat" 2>/dev/null || true
    done | awk '{
        # The command is in parentheses and may hold spaces; utime and
        # stime are the 12th and 13th fields after it.
        first = index($0, "("); last = match($0, /\) [^)]*$/)
        command = substr($0, first + 1, last - first - 1); gsub(/[ \/:-].*/, "", command)
        split(substr($0, last + 2), rest, " ")
        print $1, command, rest[12] + rest[13]
    }'
}

# The CPU seconds used between two cpu_ticks_by_process snapshots (files)
# by the processes running at the second, summed by command (a process
# started in between counts whole), the busiest first, those over 0.05 s.
cpu_seconds_between() {
    local hertz
    hertz=$(getconf CLK_TCK)
    awk -v hz="$hertz" 'NR == FNR { before[$1] = $3; next }
        { used[$2] += $3 - ($1 in before ? before[$1] : 0) }
        END { for (c in used) if (used[c] / hz > 0.05) printf "%s %.2f\n", c, used[c] / hz }' \
        "$1" "$2" | sort -k2 -rn
}

# VmHWM in KiB, summed over the given pids.
peak_rss_kib() {
    local pid total=0 value
    for pid in "$@"; do
        value=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$((total + ${value:-0}))
    done
    echo "$total"
}

# The median of the numbers on stdin, separated by spaces or lines, to three
# decimals without trailing zeros (a download of about a second must not
# round to 1.0).
median() {
    tr -s ' ' '\n' | sed '/^$/d' | sort -g | awk '{ v[NR] = $1 } END {
        m = sprintf("%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)
        sub(/0+$/, "", m); sub(/\.$/, "", m); print m }'
}

# MiB per second of BYTES bytes in SECONDS seconds.
mibps() { awk -v bytes="$1" -v s="$2" 'BEGIN { printf "%.1f", bytes / 1048576 / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t ? "met" : "MISSED") }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
