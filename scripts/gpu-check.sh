#!/usr/bin/env bash
# Builds the GPU check bundle (gpu-bundle/, at most 64 MiB): the residual binary and every test
# binary (stripped, xz-compressed), python_ref/, the Fashion-MNIST files and run.sh, which runs
# parity, tests, training and a speed comparison on a GPU host with PyTorch 2.11 (no Rust needed).
# Usage: scripts/gpu-check.sh [BUNDLE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-gpu-bundle}
rm -rf "$bundle"
mkdir -p "$bundle/bin/tests" "$bundle/python_ref" "$bundle/data/fashion-mnist"

cargo build --quiet
pack() { strip -o "$bundle/tmp.bin" "$1" && xz -6 -T2 -c "$bundle/tmp.bin" > "$2" && rm "$bundle/tmp.bin"; }
pack target/debug/residual "$bundle/bin/residual.xz"
cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"].get("test") \
            and "/tests/" in m["target"]["src_path"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  pack "$exe" "$bundle/bin/tests/$name.xz"
done
cp python_ref/*.py python_ref/requirements.txt "$bundle/python_ref/"
cp /usr/share/datasets/fashion-mnist/*.gz "$bundle/data/fashion-mnist/"
cp scripts/gpu-runner.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"

size=$(du -sb "$bundle" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "gpu bundle: $bundle ($((size / 1024 / 1024)) MiB, $(ls "$bundle/bin/tests" | wc -l) test binaries)"
if ((size > limit)); then
  echo "error: the bundle exceeds 64 MiB" >&2
  exit 1
fi
echo "on the GPU host: bash $bundle/run.sh OUT_DIR     (CPU-only rehearsal: add --dry-run)"
