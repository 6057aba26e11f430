# The small-paths part of ops/bench-push.sh (issue 14): N small paths
# pushed three ways into a running one-machine server, each until every
# path is visible, each into a fresh cache and with NARs no other run
# pushed (so nothing is deduplicated, by path or by NAR):
#
#   1. bench_push's own pusher: Attic's `upload-path`, JOBS in flight,
#      NARs of 10-500 KiB of real file contents made in memory.
#   2. `larder push -j JOBS`, the real client, of N store paths added to a
#      chroot Nix store (`nix-store --add` of directories of real files,
#      10-500 KiB each, distinct each run).
#   3. `nix copy --to 'http://…/CACHE?compression=zstd'` of another N such
#      store paths, authenticated by a netrc entry holding the token.
#
# Source it from a benchmark that has set: bin (release binaries: bench_push,
# larder), work, HOST, larder (the server's URL), token (push and
# create-cache on bench-*), small (N), jobs (JOBS), small_source (a
# directory of real files) and started_at; it defines `bench_small_paths
# VARS_FILE ROUTES_FILE`, which writes SMALL_SECONDS, SMALL_BYTES,
# LARDER_PUSH_SECONDS, NIX_COPY_SECONDS and STORE_PATH_BYTES (the NAR bytes
# of each set of store paths) as KEY=VALUE lines to VARS_FILE, and to
# ROUTES_FILE the server's time per request of each route during each of
# the three pushes (from larder_http_request_duration_seconds), so that a
# slower small path shows which request became slower.

# Makes N directories under DIR of real files from $small_source, 10-500
# KiB each (whole files, the last one cut), each with a file naming the
# set SALT and its index, so that every run and set adds new store paths.
#   make_small_sources DIR N SALT
make_small_sources() {
    python3 - "$1" "$2" "$3" "$small_source" <<'EOF'
import os, random, sys

out, count, salt, source = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
files = sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(source)
    for name in names
    if os.path.isfile(os.path.join(root, name)) and not os.path.islink(os.path.join(root, name))
)
dice = random.Random(salt)
for index in range(count):
    directory = os.path.join(out, f"p{index}")
    os.makedirs(directory)
    with open(os.path.join(directory, "salt"), "w") as file:
        file.write(f"{salt} {index}\n")
    left = dice.randint(10 << 10, 500 << 10)
    start = dice.randrange(len(files))
    n = 0
    while left > 0:
        path = files[(start + n) % len(files)]
        with open(path, "rb") as file:
            data = file.read(left)
        with open(os.path.join(directory, f"{n:03}-{os.path.basename(path)}"), "wb") as file:
            file.write(data)
        left -= len(data)
        n += 1
EOF
}

# Adds the directories under DIR to the chroot store and prints the store
# paths, one a line.
add_small_sources() {
    local sources=("$1"/p*)
    nix-store --add "${sources[@]}"
}

# Seconds (wall clock) that the command takes, its output discarded.
small_seconds_of() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

# The server's request durations so far: "route method count seconds"
# lines, one per route and method.
request_seconds() {
    curl -sf "$larder/metrics" | awk '
        /^larder_http_request_duration_seconds_(sum|count)\{/ {
            match($0, /route="[^"]*"/); route = substr($0, RSTART + 7, RLENGTH - 8)
            match($0, /method="[^"]*"/); method = substr($0, RSTART + 8, RLENGTH - 9)
            key = route " " method
            if ($0 ~ /_sum\{/) sum[key] = $NF; else count[key] = $NF
        }
        END { for (k in count) print k, count[k], sum[k] }' | sort
}

# Prints, under the heading $1, the requests answered between the
# request_seconds snapshots $2 and $3: route, method, requests, and the
# server's milliseconds per request.
request_times_between() {
    echo "$1"
    local keyed='{ print $1 "|" $2, $3, $4 }'
    LC_ALL=C join -j 1 -a 2 -e 0 -o 0,1.2,1.3,2.2,2.3 \
        <(awk "$keyed" "$2" | LC_ALL=C sort -k1,1) <(awk "$keyed" "$3" | LC_ALL=C sort -k1,1) |
        awk '{ n = $4 - $2; if (n > 0) { split($1, rm, "|"); printf "  %-34s %-5s %6d requests %8.2f ms each\n", rm[1], rm[2], n, ($5 - $3) / n * 1000 } }'
}

bench_small_paths() {
    local vars=$1 routes=$2 client=$work/small-client store=$work/small-store
    local larder_paths nix_paths nar_bytes cache status
    say "pushing $small small paths with bench_push, $jobs at a time"
    request_seconds >"$work/requests-0"
    "$bin/bench_push" --url "$larder" --token "$token" --cache bench-small \
        small "$small" "$jobs" "$small_source" >"$vars"
    request_seconds >"$work/requests-1"

    # The clients' own home, config and chroot store, in a subshell so that
    # none of it reaches the rest of the benchmark.
    (
        mkdir -p "$client/home" "$client/nix-conf" "$store"
        export HOME=$client/home XDG_CONFIG_HOME=$client/home/.config
        export XDG_STATE_HOME=$client/home/.local/state XDG_CACHE_HOME=$client/home/.cache
        export NIX_CONF_DIR=$client/nix-conf
        printf 'machine %s password %s\n' "$HOST" "$token" >"$client/netrc"
        export NIX_CONFIG="experimental-features = nix-command
store = $store
substituters =
fsync-metadata = false
netrc-file = $client/netrc"
        unset NIX_REMOTE

        say "adding 2 x $small store paths of 10-500 KiB of $small_source"
        make_small_sources "$client/larder-sources" "$small" "larder-$started_at-$$"
        make_small_sources "$client/nix-sources" "$small" "nix-$started_at-$$"
        mapfile -t larder_paths < <(add_small_sources "$client/larder-sources")
        mapfile -t nix_paths < <(add_small_sources "$client/nix-sources")
        ((${#larder_paths[@]} == small && ${#nix_paths[@]} == small)) ||
            die "nix-store --add printed ${#larder_paths[@]} and ${#nix_paths[@]} paths, expected $small"
        nar_bytes=$(nix path-info --json "${larder_paths[@]}" |
            python3 -c 'import json, sys; print(sum(p["narSize"] for p in json.load(sys.stdin)))')

        "$bin/larder" login bench "$larder" "$token" >/dev/null
        for cache in bench-larder bench-nix; do
            "$bin/larder" cache create "$cache" >/dev/null
        done

        say "pushing $small store paths with larder push -j $jobs"
        status=0
        seconds=$(small_seconds_of "$bin/larder" push bench-larder -j "$jobs" "${larder_paths[@]}" \
            2>"$client/larder-push.err") || status=$?
        ((status == 0)) || die "larder push failed: $(tail -n 5 "$client/larder-push.err")"
        echo "LARDER_PUSH_SECONDS=$seconds"
        request_seconds >"$work/requests-2"

        say "copying $small other store paths with nix copy --to (zstd)"
        seconds=$(small_seconds_of nix copy --to "$larder/bench-nix?compression=zstd" \
            "${nix_paths[@]}" 2>"$client/nix-copy.err") || status=$?
        ((status == 0)) || die "nix copy failed: $(tail -n 5 "$client/nix-copy.err")"
        echo "NIX_COPY_SECONDS=$seconds"
        echo "STORE_PATH_BYTES=$nar_bytes"
        request_seconds >"$work/requests-3"
    ) >>"$vars"
    {
        request_times_between "bench_push's small paths:" "$work/requests-0" "$work/requests-1"
        request_times_between "larder push:" "$work/requests-1" "$work/requests-2"
        request_times_between "nix copy --to:" "$work/requests-2" "$work/requests-3"
    } >"$routes"
}
