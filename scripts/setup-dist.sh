#!/usr/bin/env bash
# Headers for the c10d backends of `residual train` under torchrun, when missing: gloo's (Debian's
# libgloo-dev; the Gloo code itself runs from libtorch_cpu) and, for a CUDA torch whose CUDA 13
# wheels lack CCCL's headers, the nvidia-cuda-cccl wheel (the NCCL backend's headers include
# them). The build still succeeds without them, with the backend left out (`residual doctor`).
# Usage: scripts/setup-dist.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: setup-dist.sh VENV_DIR}
if [[ ! -f /usr/include/gloo/config.h ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing libgloo-dev (Gloo headers for distributed training)"
    apt-get install -y libgloo-dev >/dev/null || { apt-get update >/dev/null && apt-get install -y libgloo-dev >/dev/null; } ||
      echo "setup: could not install libgloo-dev; building without the Gloo backend" >&2
  else
    echo "setup: no Gloo headers; for distributed training run: sudo apt-get install -y libgloo-dev" >&2
  fi
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -f $site/torch/lib/libtorch_cuda.so && -f $site/nvidia/cu13/include/cuda_runtime_api.h &&
      ! -e $site/nvidia/cu13/include/nv/target ]]; then
  echo "setup: installing nvidia-cuda-cccl (CUDA headers the NCCL backend needs)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "nvidia-cuda-cccl==13.0.85" ||
    echo "setup: could not install nvidia-cuda-cccl; building without the NCCL backend" >&2
fi
