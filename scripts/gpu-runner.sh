#!/usr/bin/env bash
# The GPU check, on a host with an NVIDIA GPU, PyTorch 2.11 (+ torchvision 0.26) as python3, and no
# Rust or network: regenerates the references with the host's PyTorch, then runs residual doctor,
# every test binary (CUDA present: no test may skip), the parity report on all devices, the
# degradation experiment on the full Fashion-MNIST in bf16 and fp32, and a speed comparison with
# PyTorch eager. Writes at most 8 files into OUT_DIR: log.txt, results.json, and the experiment
# reports and plots. `--dry-run` runs the same sequence on a CPU-only machine (CUDA steps skipped,
# small sizes).
# Usage: bash run.sh OUT_DIR [--dry-run]
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUT_DIR [--dry-run]}
dry=0
[[ ${2:-} == --dry-run ]] && dry=1
mkdir -p "$out" && out=$(cd "$out" && pwd)
exec > >(tee "$out/log.txt") 2>&1
python=${PYTHON:-python3}
work=${RESIDUAL_WORK:-$(mktemp -d)}
mkdir -p "$work"
failures=()
step() { echo; echo "== $*"; }

torch_dir=$($python -c 'import os, torch; print(os.path.dirname(torch.__file__))') || { echo "no PyTorch in $python"; exit 1; }
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
$python - "$here/bin" "$work/bin" <<'PY'
import lzma, os, sys
src, dst = sys.argv[1], sys.argv[2]
for root, _, files in os.walk(src):
    for f in files:
        target = os.path.join(dst, os.path.relpath(root, src), f[:-3])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with lzma.open(os.path.join(root, f)) as i, open(target, "wb") as o:
            o.write(i.read())
        os.chmod(target, 0o755)
PY
export RESIDUAL_BIN="$work/bin/residual" RESIDUAL_SOURCE="$here" RESIDUAL_PYTHON="$(command -v "$python")"
export RESIDUAL_PYTHON_REF=${RESIDUAL_PYTHON_REF:-$work/python_ref}
bin=$RESIDUAL_BIN
device=cuda
((dry)) && device=cpu

step "python_ref references with the host's PyTorch ($RESIDUAL_PYTHON_REF)"
if [[ -n ${REUSE_REFS:-} && -f $RESIDUAL_PYTHON_REF/manifest.json ]]; then
  echo "reusing existing references"
else
  (cd "$here/python_ref" && $python export.py --out "$RESIDUAL_PYTHON_REF") | tail -n 2 || failures+=("references")
fi

step "residual doctor"
$bin doctor | tee "$work/doctor.txt" || failures+=("doctor")
$bin doctor --json > "$work/doctor.json" 2>/dev/null

step "test binaries"
: > "$work/tests.txt"
for t in "$work"/bin/tests/*; do
  name=$(basename "$t")
  if "$t" --test-threads 2 > "$work/test-$name.log" 2>&1; then status=ok; else status=FAILED; failures+=("test $name"); fi
  skipped=$(grep -c "skipped: no CUDA device" "$work/test-$name.log")
  summary=$(grep -E "^test result" "$work/test-$name.log" | tail -n 1)
  echo "$name: $status, $summary, CUDA skips: $skipped" | tee -a "$work/tests.txt"
  if ((!dry && skipped > 0)); then failures+=("test $name skipped CUDA"); fi
  [[ $status == ok ]] || tail -n 30 "$work/test-$name.log"
done

step "residual parity --device all --json"
$bin parity --device all --json > "$work/parity.json" || failures+=("parity")
$python -c "import json,sys; rows=json.load(open(sys.argv[1])); print(f'{sum(r[\"pass\"] for r in rows)} of {len(rows)} rows pass'); [print(r['case'], r['device'], r['max_abs_forward'], r['max_abs_grad']) for r in rows if r['device']!='cpu' or not r['pass']]" "$work/parity.json"

step "degradation experiment"
if ((dry)); then
  settings=(--depths 8,14 --subset 256 --epochs 1 --batch-size 64 --device cpu --quiet)
  precisions=(fp32)
  echo "bf16: skipped (no CUDA device)"
else
  settings=(--depths 20,56 --epochs "${EPOCHS:-6}" --batch-size 128 --device cuda --cudnn-benchmark --quiet)
  precisions=(bf16 fp32)
fi
for p in "${precisions[@]}"; do
  amp=()
  [[ $p == bf16 ]] && amp=(--amp bf16)
  $bin experiment degradation "${settings[@]}" "${amp[@]}" --data "$here/data/fashion-mnist" --out "$work/experiment-$p" \
    || failures+=("experiment $p")
  cp "$work/experiment-$p/report.md" "$out/report-$p.md" 2>/dev/null
  cp "$work/experiment-$p/train_error.png" "$out/train_error-$p.png" 2>/dev/null
  cp "$work/experiment-$p/test_error.png" "$out/test_error-$p.png" 2>/dev/null
done

step "speed: PyTorch eager vs residual (resnet50)"
quick=()
((dry)) && quick=(--quick)
(cd "$here/python_ref" && $python bench_gpu.py --residual "$bin" --device "$device" "${quick[@]}") > "$work/speed.json" \
  || failures+=("speed")
cat "$work/speed.json"

step "results"
printf '%s\n' "${failures[@]}" > "$work/failures.txt"
$python - "$work" "$out/results.json" "$dry" <<'PY'
import json, os, sys
work, target, dry = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except Exception as e:  # a step that failed leaves no file
        return {"missing": str(e)}
experiments = {}
for p in ("bf16", "fp32"):
    r = load(f"experiment-{p}/results.json")
    experiments[p] = "skipped (no CUDA device)" if dry and p == "bf16" else (
        {"summary": r.get("summary"), "final": [{"name": c["name"], "train_error": c["metrics"][-1]["train_error"],
         "test_error": c["metrics"][-1]["test_error"]} for c in r.get("curves", [])]} if "curves" in r else r)
failures = [l for l in open(os.path.join(work, "failures.txt")).read().splitlines() if l]
result = {"dry_run": dry, "doctor": load("doctor.json"), "tests": open(os.path.join(work, "tests.txt")).read().splitlines(),
          "parity": load("parity.json"), "experiments": experiments, "speed": load("speed.json"), "failures": failures}
with open(target, "w") as f:
    json.dump(result, f, indent=1)
print("failures:", failures or "none")
PY
echo "files: $(ls "$out" | tr '\n' ' ')"
((${#failures[@]} == 0))
