#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets: the protocol decoders, the access
# token parsers, the config
# parser, the on-disk block header and use order decoders) for a fixed time with libFuzzer, from
# the committed corpora, with a memory cap so that an allocation sized by an
# unchecked length fails the run. Needs the nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly; cargo install cargo-fuzz`).
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
# New inputs go to a scratch directory (libFuzzer writes into the first corpus
# it is given), so a run does not grow the committed corpora.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in protocol_frames config_toml block_header access_token use_order; do
    echo "fuzz: $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -malloc_limit_mb=128 -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 2>&1 \
        | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|==|SUMMARY|Done)" || true
    if [ -n "$(ls fuzz/artifacts/"$target" 2>/dev/null)" ]; then
        echo "fuzz: $target found a failing input in fuzz/artifacts/$target" >&2
        exit 1
    fi
done
echo "fuzz: no crash, hang or oversized allocation"
