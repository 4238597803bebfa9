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

FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT := target/demo/degradation
# CPU-sized degradation experiment: 3 seeds of plain and residual 8- and 32-layer nets on 6000
# training images (4 epochs, 376 iterations at batch 64, lr 0.05 = the paper's 0.1 scaled to half
# its batch), test error on 2000 test images. Why these sizes: README, "The degradation demo".
DEMO_EXPERIMENT := --depths 8,32 --seeds 3 --subset 6000 --test-subset 2000 --epochs 4 --batch-size 64 --lr 0.05 --device auto --quiet
# Veit et al. 2016 on the degradation demo's seed-0 32-layer runs (reused, not retrained): gradient
# flow, lesion study (2 draws per k, 500 test images), path analysis. README, "Why residual
# networks train".
DEMO_VEIT_OUT := target/demo/veit
DEMO_VEIT := --depth 32 --runs-from $(DEMO_OUT) --subset 6000 --test-subset 500 --epochs 4 --batch-size 64 --lr 0.05 --draws 2 --probe-batch 64 --device auto --quiet

# Fine-tuning demonstration (README, "Fine-tuning"): python_ref/finetune_demo.py pretrains
# torchvision's resnet18 on Fashion-MNIST classes 0-4 and writes classes 5-9 as PNG class folders;
# residual fine-tunes it there with --init-weights (new 5-class head, backbone at a fifth of the
# rate) and trains the same model from scratch for the same budget; then the report (accuracy,
# confusion matrices, plot) and the training step's images/s against PyTorch.
FT_OUT := target/finetune-demo
FT_RESIDUAL ?= target/debug/residual
FT_TRAIN := --data $(FT_OUT)/data --image-size 32 --eval-resize 32 --scale 0.35,1 --epochs 3 \
  --batch-size 64 --lr 0.05 --schedule cosine --weight-decay 5e-4 --workers 2 --device auto --quiet

.PHONY: experiment-full all setup data artifacts build test lint demo finetune-demo doctor parity bench gpu-check gpu-check-dry clean-artifacts

all: test

setup:
	@scripts/setup-python.sh "$(RESIDUAL_VENV)"
	@scripts/setup-dist.sh "$(RESIDUAL_VENV)"

# Regenerated when a python_ref script or the pinned packages change.
REFERENCE_SOURCES := $(addprefix python_ref/,export.py reference.py resnet_ref.py resnet_cases.py shape_cases.py checkpoints.py timm_hf_cases.py preprocess.py probe_cases.py ddp_ref.py)
$(MANIFEST): $(REFERENCE_SOURCES) python_ref/requirements.txt | setup
	$(PYTHON) python_ref/export.py --out $(ARTIFACTS)

artifacts: setup $(MANIFEST)

# Real training data (Debian's dataset-fashion-mnist) and a font for the plots.
data:
	@scripts/setup-data.sh

build: setup
	cargo build

lint: setup
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test: artifacts lint data
	cargo test
	$(MAKE) gpu-check-dry

# The GPU bundle (gpu-bundle/, <= 64 MiB, release build) for a GPU host; see scripts/gpu-runner.sh.
gpu-check: artifacts data
	scripts/gpu-check.sh gpu-bundle

# The bundle's whole sequence on this CPU-only machine, so it cannot rot (CI runs it). Its PyTorch is
# a hard-linked copy of the venv at another path (no extra disk space): the bundled binaries have no
# run path, and the run fails unless they reach libtorch only through the LD_LIBRARY_PATH run.sh
# sets, at that other path, as on a GPU host. Like a bare PyTorch install, it lacks safetensors (the
# bundle's copy is used).
DRY_VENV := $(CURDIR)/target/gpu-check-dry-venv
DRY_WORK := $(CURDIR)/target/gpu-check-dry-work
# A dry run that passed records what it ran: every file of the bundle (binaries, scripts, data,
# build-info.json with the commit), the references, the pinned packages and this Makefile. The same
# inputs again (a second `make test` in a built tree) need no second run: ~35 s saved; a fresh clone
# has no record and runs it. FORCE_DRY=1 runs it anyway.
DRY_PASSED := $(CURDIR)/target/gpu-check-dry.passed
gpu-check-dry: gpu-check
	@set -e; \
	key=$$( (cd gpu-bundle && find . -type f | LC_ALL=C sort | xargs sha256sum) | \
	  cat - $(MANIFEST) $(RESIDUAL_VENV)/.residual-requirements.txt Makefile | sha256sum | cut -c1-64); \
	if [ -z "$(FORCE_DRY)" ] && [ "$$key" = "$$(cat $(DRY_PASSED) 2>/dev/null)" ]; then \
	  echo "gpu-check-dry: this bundle passed the dry run already (target/gpu-check-dry/log.txt; inputs sha256 $$key); FORCE_DRY=1 runs it again"; \
	  exit 0; \
	fi; \
	rm -f $(DRY_PASSED); \
	if ! cmp -s $(RESIDUAL_VENV)/.residual-requirements.txt $(DRY_VENV)/.residual-requirements.txt; then \
	  echo "gpu-check-dry: hard-linking $(RESIDUAL_VENV) to $(DRY_VENV)"; \
	  rm -rf $(DRY_VENV) && cp -al "$$(readlink -f $(RESIDUAL_VENV))" $(DRY_VENV) || { \
	    echo "gpu-check-dry: cannot hard-link the venv (another file system?)" >&2; exit 1; }; \
	fi; \
	rm -rf $(DRY_VENV)/lib/python3*/site-packages/safetensors $(DRY_VENV)/lib/python3*/site-packages/packaging; \
	rm -rf $(DRY_WORK); \
	REUSE_REFS=1 RESIDUAL_PYTHON_REF=$(CURDIR)/$(ARTIFACTS) RESIDUAL_WORK=$(DRY_WORK) PYTHON=$(DRY_VENV)/bin/python \
	  REQUIRE_MOVED_LIBTORCH=1 BUDGET_S=1500 bash gpu-bundle/run.sh target/gpu-check-dry --dry-run; \
	echo "$$key" > $(DRY_PASSED)

doctor: build
	cargo run --quiet -- doctor

parity: artifacts build
	cargo run --quiet -- parity --device all

demo: artifacts build data
	@echo "== residual doctor"
	@cargo run --quiet -- doctor
	@echo
	@echo "== residual parity --device all (Rust vs PyTorch $(shell $(PYTHON) -c 'import torch; print(torch.__version__)' 2>/dev/null))"
	@cargo run --quiet -- parity --device all
	@echo
	@echo "== residual experiment degradation $(DEMO_EXPERIMENT) --data $(FASHION_MNIST)"
	@cargo run --quiet -- experiment degradation $(DEMO_EXPERIMENT) --data $(FASHION_MNIST) --out $(DEMO_OUT)
	@echo
	@echo "report: $(DEMO_OUT)/report.md"
	@echo "plots:  $(DEMO_OUT)/train_error.png $(DEMO_OUT)/test_error.png"
	@echo
	@echo "== make finetune-demo (a PyTorch-pretrained resnet18 fine-tuned on PNG class folders)"
	@$(MAKE) --no-print-directory finetune-demo
	@echo
	@echo "== residual experiment veit $(DEMO_VEIT) --data $(FASHION_MNIST)"
	@cargo run --quiet -- experiment veit $(DEMO_VEIT) --data $(FASHION_MNIST) --out $(DEMO_VEIT_OUT)

$(FT_OUT)/pretrained_resnet18.pth: python_ref/finetune_demo.py | setup
	$(PYTHON) python_ref/finetune_demo.py pretrain --data $(FASHION_MNIST) --out $@

$(FT_OUT)/data.complete: python_ref/finetune_demo.py | setup
	rm -rf $(FT_OUT)/data
	$(PYTHON) python_ref/finetune_demo.py folder --data $(FASHION_MNIST) --out $(FT_OUT)/data
	touch $@

finetune-demo: build data $(FT_OUT)/pretrained_resnet18.pth $(FT_OUT)/data.complete
	@printf '{"arch": "resnet18"}\n' > $(FT_OUT)/resnet18.json
	rm -rf $(FT_OUT)/finetuned $(FT_OUT)/scratch
	@echo "== residual train --init-weights (fine-tuning the PyTorch-pretrained resnet18)"
	cargo run --quiet -- train --config $(FT_OUT)/resnet18.json --init-weights $(FT_OUT)/pretrained_resnet18.pth \
	  --num-classes 5 --fresh-head --lr-backbone 0.01 $(FT_TRAIN) --out $(FT_OUT)/finetuned
	@echo "== residual train (the same resnet18 from scratch, same budget)"
	cargo run --quiet -- train --config $(FT_OUT)/resnet18.json --num-classes 5 $(FT_TRAIN) --out $(FT_OUT)/scratch
	@echo
	cargo run --quiet --example finetune_report -- $(FT_OUT)/data $(FT_OUT) fine-tuned=$(FT_OUT)/finetuned from-scratch=$(FT_OUT)/scratch
	@echo
	@echo "== training step, residual ($(FT_RESIDUAL)) vs PyTorch eager, same model, batch and threads"
	$(PYTHON) python_ref/finetune_demo.py throughput --residual $(FT_RESIDUAL) --out $(FT_OUT)/throughput.json

# The paper's full-size degradation experiment, on a GPU (hours; resumes where it stopped):
# depths 20/32/44/56/110, all 60k images, 64k iterations at batch 128. FULL_EPOCHS=1 for a try.
FULL_EPOCHS ?= 137
experiment-full: build data
	cargo run --release --quiet -- experiment degradation --depths 20,32,44,56,110 --seeds 1 \
	  --epochs $(FULL_EPOCHS) --batch-size 128 --lr 0.1 --device cuda --amp bf16 --cudnn-benchmark \
	  --quiet --data $(FASHION_MNIST) --out target/experiment-full-$(FULL_EPOCHS)ep

# Inference latency (PyTorch eager and frozen TorchScript vs residual plain and fast), training
# throughput (python_ref/bench_train.py's comparison), start-up time, peak RSS and memory growth,
# side by side in one run, on the release build. QUICK=1 for a shorter run (fewer calls).
# Table: printed, and in target/bench/inference.{md,json}.
bench: setup
	cargo build --release
	$(PYTHON) python_ref/bench_infer.py --residual target/release/residual --out target/bench $(if $(filter-out 0,$(QUICK)),--quick)
	@echo "== checkpoint loading: residual vs torch.load / safetensors (scripts/bench-load.sh)"
	scripts/bench-load.sh
	@echo "== image-folder input pipeline vs DataLoader(num_workers=2) (python_ref/bench_pipeline.py)"
	cargo build --release --quiet --example bench_pipeline
	$(PYTHON) python_ref/bench_pipeline.py --residual-bench target/release/examples/bench_pipeline

clean-artifacts:
	rm -rf $(ARTIFACTS)
