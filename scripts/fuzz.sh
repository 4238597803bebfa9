#!/usr/bin/env bash
# Fuzzes the checkpoint reader with libFuzzer (cargo-fuzz, nightly toolchain) for SECONDS, seeded
# with the small checkpoint fixtures, and prints how many inputs it ran.
# Usage: scripts/fuzz.sh [SECONDS]   (needs `make artifacts` and `cargo install cargo-fuzz`)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
corpus=target/fuzz-corpus/checkpoint_reader
mkdir -p "$corpus"
cp target/python_ref/checkpoints/layouts*.pth target/python_ref/checkpoints/layouts.safetensors "$corpus"/
# The fuzz binary is another package's: it gets no run path from build.rs.
export LD_LIBRARY_PATH="$(readlink -f "${LIBTORCH:-.libtorch}")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo +nightly fuzz run --fuzz-dir fuzz checkpoint_reader "$corpus" -- \
  -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee target/fuzz.log | tail -n 25
grep -E "stat::number_of_executed_units|Done [0-9]+ runs" target/fuzz.log || true
