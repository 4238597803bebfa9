#!/usr/bin/env bash
# Builds the GPU check bundle (gpu-bundle/, at most 64 MiB): the release `residual` binary and every
# release test binary (stripped, run path removed, xz-compressed), python_ref/, the Fashion-MNIST
# files, build-info.json and run.sh (scripts/gpu-runner.sh), which runs doctor, the CUDA tests,
# CUDA parity, a speed comparison and the degradation experiment on a GPU host with PyTorch 2.11
# (no Rust needed).
#
# The binaries cargo builds find libtorch through a run path to this machine's PyTorch (build.rs).
# On the GPU host PyTorch lives elsewhere, so the bundled copies have no run path at all: run.sh
# puts the host's torch/lib on LD_LIBRARY_PATH, the only way they can find libtorch. (patchelf:
# scripts/setup-data.sh installs it.)
# Usage: scripts/gpu-check.sh [BUNDLE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-gpu-bundle}
command -v patchelf >/dev/null || {
  echo "error: patchelf is missing: run scripts/setup-data.sh (make data) or apt-get install patchelf" >&2
  exit 1
}
rm -rf "$bundle"
mkdir -p "$bundle/bin/tests" "$bundle/python_ref" "$bundle/data/fashion-mnist"

log=target/gpu-check-build.log
cargo build --release --quiet
# pack BINARY OUT.xz: strip, drop the run path (and check it is gone), compress. A binary packed
# before and not rebuilt since (same path, inode, size and modification time) is copied from
# target/gpu-bundle-packed/ instead: stripping and xz take ~1 s of CPU per binary, and in a built
# tree (`make test` again) no binary has changed.
cache=target/gpu-bundle-packed
mkdir -p "$cache"
pack() {
  local key cached="$cache/${2#"$bundle"/}"
  key=$(stat -c '%n %i %s %Y' "$(readlink -f "$1")")
  if [[ -f $cached && -f $cached.key && $(<"$cached.key") == "$key" ]]; then
    cp "$cached" "$2"
    return
  fi
  local tmp="$bundle/tmp.bin"
  strip -o "$tmp" "$1"
  patchelf --remove-rpath "$tmp"
  if readelf -d "$tmp" | grep -qE '\((RPATH|RUNPATH)\)'; then
    echo "error: $1 keeps a run path" >&2
    return 1
  fi
  xz -6 -T2 -c "$tmp" > "$2"
  rm "$tmp"
  mkdir -p "$(dirname "$cached")"
  cp "$2" "$cached"
  echo "$key" > "$cached.key"
}
pack target/release/residual "$bundle/bin/residual.xz"
if ! cargo test --release --no-run --message-format=json > "$log.json" 2> "$log"; then
  cat "$log" >&2
  exit 1
fi
python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test") \
            and "/tests/" in m["target"]["src_path"]:
        print(m["target"]["name"], m["executable"])
' "$log.json" > "$bundle/tests.txt"
while read -r name exe; do
  pack "$exe" "$bundle/bin/tests/$name.xz"
done < "$bundle/tests.txt"
rm "$bundle/tests.txt"
cp python_ref/*.py python_ref/requirements.txt "$bundle/python_ref/"
# The independent checks' oracles: the original SiD code and the seed document.
cp -r python_ref/original "$bundle/python_ref/"
mkdir -p "$bundle/seed"
cp ../shared/seed/*.txt "$bundle/seed/" 2>/dev/null || echo "note: ../shared/seed not found; the bundle's independent checks will lack the seed document"
# export.py needs safetensors (and its packaging), which PyTorch does not bring: run.sh falls back to
# these copies when the host's Python lacks them (safetensors is an abi3 wheel: any CPython >= 3.8).
mkdir -p "$bundle/python_ref/vendor"
for package in safetensors packaging; do
  src=$("${PYTHON:-.venv/bin/python}" -c "import os, $package; print(os.path.dirname($package.__file__))")
  cp -r "$src" "$bundle/python_ref/vendor/"
done
find "$bundle/python_ref/vendor" -name __pycache__ -prune -exec rm -rf {} +
cp /usr/share/datasets/fashion-mnist/*.gz "$bundle/data/fashion-mnist/"
cp scripts/gpu-runner.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"
# The libtorch the binaries were built against: run.sh shows it is not the one they load.
python3 -c '
import json, os, subprocess, sys
lib = os.path.realpath(os.path.join(os.environ.get("LIBTORCH", ".libtorch"), "lib"))
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"libtorch_lib": lib, "profile": "release", "commit": commit}, open(sys.argv[1], "w"))
' "$bundle/build-info.json"

size=$(du -sb "$bundle" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "gpu bundle: $bundle ($((size / 1024 / 1024)) MiB of 64, $(ls "$bundle/bin/tests" | wc -l) test binaries, release, no run path)"
if ((size > limit)); then
  echo "error: the bundle exceeds 64 MiB" >&2
  exit 1
fi
echo "on the GPU host: QUICK=1 bash $bundle/run.sh OUT_DIR     (CPU-only rehearsal: add --dry-run)"
