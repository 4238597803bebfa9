#!/usr/bin/env bash
# Creates or reuses the Python environment with the pinned packages (python_ref/requirements.txt),
# and points .libtorch at its torch/ folder unless the user set LIBTORCH.
# Usage: scripts/setup-python.sh VENV_DIR
set -euo pipefail
venv=${1:?usage: setup-python.sh VENV_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
req="$here/python_ref/requirements.txt"
stamp="$venv/.residual-requirements.txt"

if [[ ! -x "$venv/bin/python" ]]; then
  echo "setup: creating Python environment in $venv"
  mkdir -p "$(dirname "$venv")"
  if ! python3 -m venv "$venv" 2>/tmp/residual-venv.err; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "setup: python3 -m venv failed; installing python3-venv"
      rm -rf "$venv"
      apt-get install -y python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      cat /tmp/residual-venv.err >&2
      echo "setup: python3 -m venv failed: run 'sudo apt-get install -y python3-venv', then make again" >&2
      exit 1
    fi
  fi
fi

if ! cmp -s "$req" "$stamp"; then
  echo "setup: installing the pinned packages into $venv (torch 2.11.0 is ~4.7 GB the first time)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi

# The environment the round-trip tests call into (`.cargo/config.toml`: RESIDUAL_PYTHON is
# .venv/bin/python; reached through the folder link, Python still finds its pyvenv.cfg).
ln -sfn "$venv" "$here/.venv"

if [[ -n "${LIBTORCH:-}" ]]; then
  echo "setup: using LIBTORCH=$LIBTORCH (set by you)"
else
  torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  if [[ "$(readlink "$here/.libtorch" 2>/dev/null)" != "$torch_dir" ]]; then
    ln -sfn "$torch_dir" "$here/.libtorch"
    echo "setup: .libtorch -> $torch_dir"
  fi
fi
