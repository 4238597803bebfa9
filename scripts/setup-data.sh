#!/usr/bin/env bash
# Installs the real training data (Debian's dataset-fashion-mnist: the original gzipped IDX files
# under /usr/share/datasets/fashion-mnist), a font for the plots and patchelf (the GPU bundle's
# binaries lose their run path, see scripts/gpu-check.sh), when missing.
set -euo pipefail
need=()
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] || need+=(dataset-fashion-mnist)
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || need+=(fonts-dejavu-core)
command -v patchelf >/dev/null || need+=(patchelf)
((${#need[@]} == 0)) && exit 0
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "setup: installing ${need[*]}"
  apt-get install -y "${need[@]}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
else
  echo "setup: missing ${need[*]}; run: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
