#!/usr/bin/env bash
# Runs Larder's cargo-fuzz targets (fuzz/) for a while each.
#
#   ops/fuzz.sh [SECONDS_PER_TARGET]      default 60
#
# Idempotent: installs cargo-fuzz if missing, builds every target, then runs
# each for SECONDS_PER_TARGET seconds. Only stable Rust exists here, so
# RUSTC_BOOTSTRAP=1 lets it accept the sanitizer flags cargo-fuzz passes.
# The growing corpus lives outside the checkout
# ($LARDER_FUZZ_CORPUS, default ~/.cache/larder/fuzz-corpus); the committed
# seeds in fuzz/seeds/ are read-only inputs. A crash leaves its input in
# fuzz/artifacts/<target>/ and makes the script exit non-zero after all
# targets have run.
set -euo pipefail

seconds=${1:-60}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1
target_dir=${LARDER_FUZZ_TARGET_DIR:-$HOME/.cache/larder/fuzz-target}
corpus_root=${LARDER_FUZZ_CORPUS:-$HOME/.cache/larder/fuzz-corpus}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "==> building fuzz targets" >&2
cargo fuzz build --target-dir "$target_dir"

failed=()
for target in $(cargo fuzz list); do
    corpus=$corpus_root/$target
    mkdir -p "$corpus" "seeds/$target"
    dict=()
    case $target in
        nar_reader) dict=(-dict=nar.dict) ;;
        narinfo) dict=(-dict=narinfo.dict) ;;
    esac
    log=$(mktemp)
    echo "==> fuzzing $target for ${seconds}s" >&2
    # -rss_limit_mb bounds memory; -max_len lets NARs hold a few entries.
    if cargo fuzz run --target-dir "$target_dir" "$target" "$corpus" "seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1 \
        "${dict[@]}" >"$log" 2>&1; then
        status=ok
    else
        status=FAILED
        failed+=("$target")
        tail -n 60 "$log" >&2
    fi
    runs=$(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n1 || true)
    echo "    $target: $status${runs:+ ($runs(s))}; corpus $(find "$corpus" -type f | wc -l) inputs" >&2
    rm -f "$log"
done

if ((${#failed[@]})); then
    echo "==> fuzzing found crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "==> fuzzing passed" >&2
