#!/usr/bin/env bash
# The GPU check (`run.sh` in gpu-bundle/), on a host with an NVIDIA GPU, PyTorch 2.11 (+ torchvision
# 0.26) as python3, and no Rust or network. The steps, most important first; each runs under a
# timeout, and results.json is rewritten after every step, so a run that is cut short still says
# what it proved:
#
#   step         what                                                       H100 (est.)  QUICK=1
#   unpack       the release binaries (they have no run path: they reach the     5 s        5 s
#                host's libtorch only through LD_LIBRARY_PATH, set here)
#   references   python_ref/export.py with the host's PyTorch (13 GB)           90 s       90 s
#                (REUSE_REFS=1: reuse the work folder's when its manifest exists: 0 s)
#   doctor       residual doctor: libtorch 2.11, the host's, CUDA and cuDNN     10 s       10 s
#   tests        the CUDA tests (names with `cuda` or `libtorch`) of every       45 s       45 s
#                binary but parity_*; none may print `skipped: no CUDA device`; TESTS=all: all
#   parity       residual parity --device cuda --json: every case, CUDA         45 s       45 s
#                against the CPU references, TF32 off
#   speed        resnet50, PyTorch eager vs residual (python_ref/bench_gpu.py)   90 s       70 s
#                and residual eager vs CUDA graph (bench-infer --cuda-graph)
#   experiment   degradation on the full Fashion-MNIST, bf16 then fp32,      2 x 160 s   2 x 35 s
#                EPOCHS epochs (6; QUICK=1: 1)
#   total                                                                     ~10 min    ~5.5 min
# A full run may not fit one 10-minute call: the budget stops the fp32 experiment at a checkpoint,
# and a second call with REUSE_REFS=1 (STEPS=experiment to skip the rest) finishes it.
#
# CPU-only parts are proven where the bundle is built (`make test`, the same libtorch release):
# the tests' CPU cases and the CPU parity rows are not rerun here.
#
# Usage: bash run.sh OUT_DIR [--dry-run]
#   OUT_DIR gets at most 8 files: log.txt, results.json, report-{bf16,fp32}.md and four plots.
#   --dry-run  the same sequence on a CPU-only machine (small sizes, CUDA parts skipped)
# Environment:
#   QUICK=1          1 epoch of the experiment, 15 timed speed steps instead of 30 (one call
#                    proves everything in about 5.5 minutes)
#   REUSE_REFS=1     reuse the references of an earlier call (RESIDUAL_PYTHON_REF/manifest.json)
#   RESIDUAL_WORK    work folder, kept between calls: binaries, references, experiment runs (an
#                    experiment cut by its timeout checkpoints; the next call resumes it)
#                    (default /tmp/residual-gpu-work)
#   BUDGET_S         seconds this call may take (default 560, under a 10-minute cut; 0: no limit):
#                    each step's timeout is clipped to what is left, and steps that no longer fit
#                    are skipped
#   STEPS            the steps to run (default: references doctor tests parity speed experiment)
#   FULL=1           the paper's full-size experiment instead: depths 20, 32, 44, 56, 110, all 60k
#                    images, 137 epochs at batch 128 (the paper's 64k iterations), bf16 only; hours
#                    of GPU time, so it runs over many calls (STEPS=experiment), each resuming the
#                    runs where the last one stopped; QUICK=1 with it: 1 epoch, one call
#   EPOCHS, TESTS=all, TEST_THREADS (4), PYTHON (python3), RESIDUAL_PYTHON_REF
#   REQUIRE_MOVED_LIBTORCH=1  fail unless libtorch is found only through LD_LIBRARY_PATH, at another
#                    path than the one the binaries were built against (`make gpu-check-dry`)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: run.sh OUT_DIR [--dry-run]}
dry=0
[[ ${2:-} == --dry-run ]] && dry=1
quick=0
[[ ${QUICK:-0} == 1 ]] && quick=1
mkdir -p "$out" && out=$(cd "$out" && pwd)
exec > >(tee "$out/log.txt") 2>&1
python=${PYTHON:-python3}
work=${RESIDUAL_WORK:-/tmp/residual-gpu-work}
mkdir -p "$work" && work=$(cd "$work" && pwd)
# This call's step outputs; the binaries, references and experiment runs beside it are kept.
state=$work/state
rm -rf "$state" && mkdir -p "$state"
budget=${BUDGET_S:-560}
t0=$SECONDS
failures=()
: > "$state/steps.tsv"
: > "$state/tests.txt"

# Writes results.json from what the steps so far left in $state (called after every step).
write_results() {
  printf '%s\n' "${failures[@]}" > "$state/failures.txt"
  $python - "$work" "$state" "$out/results.json" "$dry" "$quick" "$((SECONDS - t0))" "${1:-0}" <<'PY'
import json, os, sys
work, state, target = sys.argv[1:4]
dry, quick, elapsed, complete = sys.argv[4] == "1", sys.argv[5] == "1", int(sys.argv[6]), sys.argv[7] == "1"
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:  # a step that failed or has not run leaves no file
        return {"missing": str(e)}
def lines(name):
    try:
        return [l for l in open(os.path.join(state, name)).read().splitlines() if l]
    except OSError:
        return []
def json_lines(name):
    rows = []
    for l in lines(name):
        try:
            rows.append(json.loads(l))
        except ValueError:
            rows.append(l)
    return rows
steps = []
for line in lines("steps.tsv"):
    name, expected, seconds, status = line.split("\t")
    steps.append({"step": name, "expected_s": int(expected), "seconds": int(seconds), "status": status})
experiments = {}
for p in ("bf16", "fp32"):
    folder = open(os.path.join(state, f"experiment-{p}")).read().strip() if os.path.exists(os.path.join(state, f"experiment-{p}")) else None
    if folder is None:
        experiments[p] = "skipped (no CUDA device)" if dry and p == "bf16" else "not run"
        continue
    r = load(os.path.join(folder, "results.json"))
    experiments[p] = ({"summary": r.get("summary"), "final": [
        {"name": c["name"], "epochs": len(c["metrics"]), "train_error": c["metrics"][-1]["train_error"],
         "test_error": c["metrics"][-1]["test_error"]} for c in r.get("curves", []) if c.get("metrics")]}
        if "curves" in r else r)
result = {"dry_run": dry, "quick": quick, "complete": complete, "elapsed_s": elapsed, "steps": steps,
          "libtorch": lines("libtorch.txt"), "doctor": load(os.path.join(state, "doctor.json")),
          "tests": lines("tests.txt"), "parity": load(os.path.join(state, "parity.json")),
          "speed": load(os.path.join(state, "speed.json")), "experiments": experiments,
          "cuda_graph": json_lines("cuda_graph.jsonl"),
          "failures": lines("failures.txt")}
tmp = target + ".tmp"
with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
os.replace(tmp, target)
PY
}

# The timeout for a step: LIMIT seconds, clipped to what is left of the budget less the 20 s a
# command gets between SIGINT and SIGKILL and 5 s to write the results (0: no time left).
limit_for() {
  local limit=$1 left
  if ((budget > 0)); then
    left=$((budget - (SECONDS - t0) - 25))
    ((left < 15)) && left=0
    ((limit > left)) && limit=$left
  fi
  echo "$limit"
}

steps=" ${STEPS:-references doctor tests parity speed experiment} "
step_name='' step_expected=0 step_start=0 step_limit=0
# begin NAME EXPECTED_GPU_S EXPECTED_DRY_S TIMEOUT_S: prints the step's header with the time it is
# expected to take (on an H100; in a dry run, on 2 CPU cores); fails, recording why, when the step
# is not in STEPS or the budget has no time left for it.
begin() {
  step_name=$1 step_start=$SECONDS
  step_expected=$2
  ((dry)) && step_expected=$3
  local limit
  limit=$(limit_for "$4")
  echo
  if [[ $step_name != unpack && $steps != *" ${step_name%% *} "* ]]; then
    echo "== $step_name: not in STEPS"
    printf '%s\t%s\t0\tnot in STEPS\n' "$step_name" "$step_expected" >> "$state/steps.tsv"
    return 1
  fi
  if ((limit == 0)); then
    echo "== $step_name: skipped, the time budget (BUDGET_S=$budget) is spent"
    finish "skipped (time budget)"
    return 1
  fi
  echo "== $step_name (expected ~${step_expected}s, timeout ${limit}s; $((SECONDS - t0))s elapsed)"
  step_limit=$limit
}

# finish STATUS: records the step (ok, FAILED ..., timeout ...) and rewrites results.json.
finish() {
  local status=$1 took=$((SECONDS - step_start))
  [[ $status == ok ]] || failures+=("$step_name: $status")
  printf '%s\t%s\t%s\t%s\n' "$step_name" "$step_expected" "$took" "$status" >> "$state/steps.tsv"
  echo "-- $step_name: $status in ${took}s (expected ~${step_expected}s; $((SECONDS - t0))s elapsed)"
  write_results
}

# status_of RC: ok, or why not.
status_of() {
  case $1 in
    0) echo ok ;;
    124 | 137) echo "timeout after $((SECONDS - step_start))s" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}

# run CMD...: CMD under the step's timeout; SIGINT first (the experiment checkpoints on it), SIGKILL
# 20 s later.
run() { timeout -s INT -k 20 "$step_limit" "$@"; }

echo "residual GPU check: $(date -u +%FT%TZ), dry run: $dry, QUICK: $quick, work folder: $work, budget: ${budget}s"
read -r torch_version torch_dir < <($python -c 'import os, torch; print(torch.__version__, os.path.dirname(torch.__file__))')
if [[ -z ${torch_dir:-} ]]; then
  echo "error: no PyTorch in $python"
  failures+=("python: no PyTorch")
  write_results
  exit 1
fi
echo "PyTorch $torch_version at $torch_dir"
# export.py needs safetensors, which PyTorch does not bring: the bundle has a copy.
if ! $python -c 'import safetensors.torch' 2>/dev/null; then
  export PYTHONPATH="$here/python_ref/vendor${PYTHONPATH:+:$PYTHONPATH}"
  $python -c 'import safetensors; print(f"safetensors {safetensors.__version__}: the bundled copy (the host has none)")'
fi
# The bundled binaries have no run path: this is how they find the host's libtorch.
export LD_LIBRARY_PATH="$torch_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RESIDUAL_BIN="$work/bin/residual" RESIDUAL_SOURCE="$here" RESIDUAL_PYTHON="$(command -v "$python")"
export RESIDUAL_SEED_DIR=${RESIDUAL_SEED_DIR:-$here/seed}
export RESIDUAL_PYTHON_REF=${RESIDUAL_PYTHON_REF:-$work/python_ref}
bin=$RESIDUAL_BIN
device=cuda
((dry)) && device=cpu

if begin unpack 5 5 120; then
  rm -rf "$work/bin"
  run $python - "$here/bin" "$work/bin" <<'PY'
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
  finish "$(status_of $?)"
fi

if begin references 90 0 300; then
  if [[ ${REUSE_REFS:-0} == 1 && -f $RESIDUAL_PYTHON_REF/manifest.json ]]; then
    echo "reusing $RESIDUAL_PYTHON_REF (REUSE_REFS=1)"
    rc=0
    if ((dry)); then
      # The script still runs with this Python (imports, safetensors): one small case.
      (cd "$here/python_ref" && run $python export.py --only conv_sds_layer_small --out "$work/python_ref-dry") \
        > "$state/references.log" 2>&1
      rc=$?
      tail -n 1 "$state/references.log"
      ((rc == 0)) || tail -n 30 "$state/references.log"
    fi
    finish "$(status_of $rc)"
  else
    (cd "$here/python_ref" && run $python export.py --out "$RESIDUAL_PYTHON_REF") > "$state/references.log" 2>&1
    rc=$?
    tail -n 2 "$state/references.log"
    ((rc == 0)) || tail -n 30 "$state/references.log"
    finish "$(status_of $rc)"
  fi
fi

if begin doctor 10 2 60; then
  run "$bin" doctor
  rc=$?
  if ((rc == 0)); then
    run "$bin" doctor --json > "$state/doctor.json"
    rc=$?
  fi
  if ((rc == 0)); then
    # The libtorch the binary loaded must be the host's, found through LD_LIBRARY_PATH; without it
    # the binary must not start (no run path left to the machine that built it).
    no_path=$(env -u LD_LIBRARY_PATH "$bin" doctor 2>&1 >/dev/null | head -n 1)
    $python - "$state/doctor.json" "$torch_dir/lib" "$here/build-info.json" "$no_path" "${REQUIRE_MOVED_LIBTORCH:-0}" \
      > "$state/libtorch.txt" <<'PY'
import json, os, sys
doctor, expected, info, no_path, require = sys.argv[1:6]
loaded = json.load(open(doctor)).get("libtorch_path") or "none"
built = json.load(open(info))["libtorch_lib"]
real = os.path.realpath
ok = real(loaded) == real(expected)
print(f"loaded libtorch: {loaded} ({'the host PyTorch' if ok else 'NOT the host PyTorch ' + expected})")
print(f"built against:   {built} ({'another path' if real(built) != real(loaded) else 'the same path'})")
hidden = "cannot open shared object file" in no_path and any(n in no_path for n in ("libtorch", "libc10"))
print(f"without LD_LIBRARY_PATH: {no_path or 'starts'} ({'no run path' if hidden else 'found another way'})")
if not ok or (require == "1" and (real(built) == real(loaded) or not hidden)):
    sys.exit(1)
PY
    rc=$?
    cat "$state/libtorch.txt"
  fi
  finish "$(status_of $rc)"
fi

# The CUDA tests: names with `cuda` (or `libtorch`: how the binaries find it, its switches). The
# parity_* binaries' CUDA tests are left to the parity step, which runs the same comparisons
# (parity::run_case, every check of the tests folded into its pass flag) and reports each row.
filters=(cuda libtorch)
all_tests=0
[[ ${TESTS:-cuda} == all ]] && filters=() all_tests=1
# Test binaries that must run at least one test under the filter (a renamed test cannot drop out).
expect_tests=" cli infer training cuda_inference "
if begin tests 45 10 600; then
  echo "filter: ${filters[*]:-none (TESTS=all)}"
  test_failures=0
  for t in "$work"/bin/tests/*; do
    name=$(basename "$t")
    if ((!all_tests)) && [[ $name == parity_* ]]; then
      echo "$name: left to the parity step" | tee -a "$state/tests.txt"
      continue
    fi
    step_limit=$(limit_for 300)
    if ((step_limit == 0)); then
      echo "$name: skipped (time budget)" | tee -a "$state/tests.txt"
      test_failures=$((test_failures + 1))
      continue
    fi
    started=$SECONDS
    run "$t" "${filters[@]}" --test-threads "${TEST_THREADS:-4}" > "$state/test-$name.log" 2>&1
    status=$(status_of $?)
    skipped=$(grep -c "skipped: no CUDA device" "$state/test-$name.log")
    summary=$(grep -E "^test result" "$state/test-$name.log" | tail -n 1)
    ran=$(echo "$summary" | sed -nE 's/.* ([0-9]+) passed; ([0-9]+) failed.*/\1 \2/p' | awk '{print $1 + $2}')
    line="$name: $status in $((SECONDS - started))s, ${summary:-no summary}, CUDA skips: $skipped"
    if [[ $status == ok ]] && ((!dry && skipped > 0)); then status="skipped CUDA"; fi
    if [[ $status == ok ]] && ((!dry)) && [[ ${#filters[@]} -gt 0 && $expect_tests == *" $name "* && ${ran:-0} -eq 0 ]]; then
      status="no CUDA test ran"
    fi
    [[ $line == "$name: $status "* ]] || line="$line -> $status"
    echo "$line" | tee -a "$state/tests.txt"
    if [[ $status != ok ]]; then
      test_failures=$((test_failures + 1))
      failures+=("test $name: $status")
      tail -n 30 "$state/test-$name.log"
    fi
  done
  step_limit=0
  if ((test_failures == 0)); then finish ok; else finish "FAILED ($test_failures binaries)"; fi
fi

if begin parity 45 10 240; then
  # CUDA against the CPU references (TF32 off); the CPU rows are `make test`'s. Dry run: the CPU
  # rows of the small cases (the sequence and its report, not the numbers, are what it checks).
  parity_args=(--device cuda)
  ((dry)) && parity_args=(--device cpu --filter small)
  run "$bin" parity "${parity_args[@]}" --json > "$state/parity.json"
  rc=$?
  $python - "$state/parity.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no parity rows: {e}")
print(f"{sum(r['pass'] for r in rows)} of {len(rows)} rows pass")
for r in rows:
    if r["device"] != "cpu" or not r["pass"]:
        extra = {k: r[k] for k in r if k.startswith("max_") or k.startswith("tolerance")}
        print(r["case"], r["device"], "PASS" if r["pass"] else "FAIL", extra)
PY
  prc=$?
  ((rc == 0)) && rc=$prc
  finish "$(status_of $rc)"
fi

speed_expected=90
((quick)) && speed_expected=70
if begin speed "$speed_expected" 60 300; then
  quick_bench=()
  ((quick)) && quick_bench=(--steps 15 --warmup 5)
  ((dry)) && quick_bench=(--quick)
  (cd "$here/python_ref" && run $python bench_gpu.py --residual "$bin" --device "$device" "${quick_bench[@]}") \
    > "$state/speed.json"
  rc=$?
  cat "$state/speed.json"
  # Whether CUDA graphs pay off: the inference form eager vs replayed, alternating (batch 1 is
  # where launch overhead dominates). Not on a dry run (CUDA only).
  if ((!dry)); then
    for batch in 1 32; do
      run "$bin" bench-infer --arch resnet50 --image-size 224 --batch-size "$batch" --device cuda \
        --cuda-graph --steps 20 --warmup 5 --json >> "$state/cuda_graph.jsonl" || rc=1
    done
    cat "$state/cuda_graph.jsonl"
  fi
  finish "$(status_of $rc)"
fi

if ((dry)); then
  settings=(--depths 8,14 --seeds 1 --subset 256 --epochs 1 --batch-size 64 --device cpu --quiet)
  precisions=(fp32)
  expected=60 limit=300 tag=dry
  echo
  echo "== experiment bf16: skipped (no CUDA device)"
else
  epochs=${EPOCHS:-6}
  ((quick)) && epochs=1
  settings=(--depths 20,56 --seeds 1 --epochs "$epochs" --batch-size 128 --device cuda --cudnn-benchmark --quiet)
  precisions=(bf16 fp32)
  if [[ ${FULL:-0} == 1 ]]; then
    # He et al. 2015 §4.2: 64k iterations at batch 128 (137 epochs of 60k images), lr 0.1 divided
    # by 10 at 50% and 75%, warmup (theirs: 0.01 for ~400 iterations; here linear over epoch 1).
    epochs=${EPOCHS:-137}
    ((quick)) && epochs=1
    settings=(--depths 20,32,44,56,110 --seeds 1 --epochs "$epochs" --batch-size 128 --lr 0.1 --device cuda --cudnn-benchmark --quiet)
    precisions=(bf16)
  fi
  expected=$((10 + 25 * epochs)) limit=$((60 + 60 * epochs)) tag=${epochs}ep
  [[ ${FULL:-0} == 1 ]] && expected=$((10 + 110 * epochs)) limit=$((60 + 240 * epochs)) tag=full-${epochs}ep
fi
for p in "${precisions[@]}"; do
  if begin "experiment $p" "$expected" "$expected" "$limit"; then
    amp=()
    [[ $p == bf16 ]] && amp=(--amp bf16)
    folder="$work/experiment-$p-$tag"
    echo "$folder" > "$state/experiment-$p"
    # Finished runs in $folder are reused and interrupted ones resumed (a later call continues).
    run "$bin" experiment degradation "${settings[@]}" "${amp[@]}" --data "$here/data/fashion-mnist" --out "$folder"
    rc=$?
    for f in report.md train_error.png test_error.png; do
      [[ -f $folder/$f ]] && cp "$folder/$f" "$out/${f%.*}-$p.${f##*.}"
    done
    finish "$(status_of $rc)"
  fi
done

echo
echo "== results"
write_results 1
echo "steps (seconds, expected):"
while IFS=$'\t' read -r name expected seconds status; do
  printf '  %-16s %5ss  (~%ss)  %s\n' "$name" "$seconds" "$expected" "$status"
done < "$state/steps.tsv"
echo "total: $((SECONDS - t0))s"
echo "failures: ${failures[*]:-none}"
echo "files: $(ls "$out" | tr '\n' ' ')"
((${#failures[@]} == 0))
