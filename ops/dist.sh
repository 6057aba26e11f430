#!/usr/bin/env bash
# Builds Larder's binaries as they are shipped (the container image and
# installs from source both use it): the release profile, then each binary's
# debug info split into a file of its own, as Debian's -dbgsym packages do.
#
#   ops/dist.sh OUT                  the server's four binaries, larder and watcher-agent
#   ops/dist.sh OUT BINARY…          only those
#
# OUT/bin/BINARY is what is installed: the code and the symbol table (a
# panic's backtrace names every frame's function), no debug info.
# OUT/debug/BINARY.debug holds the line tables the release profile keeps for
# the workspace's own crates (Cargo.toml says why). The binary names it
# (.gnu_debuglink, with its checksum), and a backtrace gives the file and
# line of Larder's frames when that file lies beside the binary, in a
# `.debug` directory beside it, or under /usr/lib/debug with the binary's
# directory (/usr/lib/debug/usr/local/bin/ingest-api.debug). Debuggers
# (gdb, lldb) find it the same way.
#
# Builds into $CARGO_TARGET_DIR (default: the checkout's target/) with
# --locked; needs objcopy (binutils).
set -euo pipefail

out=${1:?usage: ops/dist.sh OUT [BINARY…]}
shift
binaries=("$@")
if ((${#binaries[@]} == 0)); then
    binaries=(ingest-api chunker-worker compressor-worker gc-scheduler larder watcher-agent)
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}

build=(cargo build --manifest-path "$repo/Cargo.toml" --release --locked)
for binary in "${binaries[@]}"; do
    build+=(--bin "$binary")
done
"${build[@]}"

mkdir -p "$out/bin" "$out/debug"
for binary in "${binaries[@]}"; do
    built=$target/release/$binary
    objcopy --only-keep-debug "$built" "$out/debug/$binary.debug"
    chmod 0644 "$out/debug/$binary.debug"
    # The link holds the debug file's name and checksum, so it is added
    # once that file exists.
    objcopy --strip-debug --add-gnu-debuglink="$out/debug/$binary.debug" \
        "$built" "$out/bin/$binary"
done
