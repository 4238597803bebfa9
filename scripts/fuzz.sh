#!/usr/bin/env bash
# Fuzzes the checkpoint reader with libFuzzer (cargo-fuzz, nightly toolchain) for SECONDS, seeded
# with the small checkpoint fixtures and deflated copies of two, and prints how many inputs it ran.
# TARGET is checkpoint_reader (whole files, through the lazy table and streamed inflation) or
# unpickler (data.pkl alone: inert objects, modules, memo).
# Usage: scripts/fuzz.sh [SECONDS] [TARGET]   (needs `make artifacts` and `cargo install cargo-fuzz`)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
target=${2:-checkpoint_reader}
corpus=target/fuzz-corpus/$target
mkdir -p "$corpus"
fixtures=target/python_ref/checkpoints
seeds=("$fixtures"/layouts*.pth "$fixtures"/layouts.safetensors "$fixtures"/tiny_*.pt*)
if [ "$target" = unpickler ]; then
  for seed in "${seeds[@]}"; do
    unzip -p "$seed" '*/data.pkl' > "$corpus/$(basename "$seed").pkl" 2>/dev/null || true
  done
else
  cp "${seeds[@]}" "$corpus"/
  # Deflated copies seed the streamed-inflation path (torch.save only writes stored entries).
  "${PYTHON:-.venv/bin/python}" - "$corpus" "$fixtures"/layouts.pth "$fixtures"/tiny_module.pth <<'PY'
import os, sys, zipfile
for path in sys.argv[2:]:
    out = os.path.join(sys.argv[1], "deflated_" + os.path.basename(path))
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
PY
fi
# The fuzz binary is another package's: it gets no run path from build.rs.
export LD_LIBRARY_PATH="$(readlink -f "${LIBTORCH:-.libtorch}")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$corpus" -- \
  -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1 2>&1 | tee target/fuzz.log | tail -n 25
grep -E "stat::number_of_executed_units|Done [0-9]+ runs" target/fuzz.log || true
