# One-command set-up: `make test` and `make demo` create or reuse the Python environment, write the
# PyTorch reference artifacts, build, and then test or run the main job.
#
#   RESIDUAL_VENV  where the Python environment lives (default ~/.cache/residual/venv, outside the
#                  clone so fresh clones reuse it)
#   LIBTORCH       a libtorch of your own (2.11.x); when unset, the venv's torch/ is used via .libtorch

RESIDUAL_VENV ?= $(HOME)/.cache/residual/venv
PYTHON := $(RESIDUAL_VENV)/bin/python
ARTIFACTS := target/python_ref
MANIFEST := $(ARTIFACTS)/manifest.json

.PHONY: all setup artifacts build test lint demo doctor parity clean-artifacts

all: test

setup:
	@scripts/setup-python.sh "$(RESIDUAL_VENV)"

# Regenerated when a python_ref script or the pinned packages change.
$(MANIFEST): python_ref/*.py python_ref/requirements.txt | setup
	$(PYTHON) python_ref/export.py --out $(ARTIFACTS)

artifacts: setup $(MANIFEST)

build: setup
	cargo build

lint: setup
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test: artifacts lint
	cargo test

doctor: build
	cargo run --quiet -- doctor

parity: artifacts build
	cargo run --quiet -- parity --device all

demo: artifacts build
	@echo "== residual doctor"
	@cargo run --quiet -- doctor
	@echo
	@echo "== residual parity --device all (Rust vs PyTorch $(shell $(PYTHON) -c 'import torch; print(torch.__version__)' 2>/dev/null))"
	@cargo run --quiet -- parity --device all

clean-artifacts:
	rm -rf $(ARTIFACTS)
