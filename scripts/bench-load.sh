#!/usr/bin/env bash
# Checkpoint loading, residual (release build of examples/load_checkpoint) against PyTorch, side by
# side in one run, page cache warm (parsing is measured, not the disk). Peak RSS is what a load adds
# to the resident size of the process with its model built (VmHWM after /proc/self/clear_refs).
#   - resnet50 and resnet152, .pth (torch.save) and .safetensors -> model ready (strict load):
#     residual's lazy load vs torch.load + load_state_dict and safetensors load_file + load_state_dict
#     (best time and largest peak of 3 loads each)
#   - inspect of a 1 GB checkpoint (wide_resnet101_2 in float64): the table alone, all of it in
#     process, and the whole `residual inspect` process (best of 5) next to a process that only
#     starts and exits (`residual --version`: loading libtorch and its static initialisers),
#     `residual-inspect` (the same output from a binary that does not load libtorch), and
#     `inspect --check` (builds the model to confirm the architecture)
#   - refusals: the 4 MB -> 4 GiB inflation bomb into resnet18, and the 1 GB checkpoint into a
#     wide_resnet101_2 with 10 classes (a shape mismatch)
# Usage: scripts/bench-load.sh   (needs the venv; writes its checkpoints, about 2.5 GB, to target/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
export LIBTORCH=${LIBTORCH:-$PWD/.libtorch}
python=.venv/bin/python
dir=target/bench
mkdir -p "$dir"
$python - "$dir" <<'PY'
import os, sys, torch, torchvision
from safetensors.torch import save_file
out = sys.argv[1]
for arch in ["resnet50", "resnet152"]:
    if not os.path.exists(f"{out}/{arch}.safetensors"):
        sd = getattr(torchvision.models, arch)().state_dict()
        torch.save(sd, f"{out}/{arch}.pth")
        save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/{arch}.safetensors")
if not os.path.exists(f"{out}/wide_resnet101_2_f64.pth"):
    sd = torchvision.models.wide_resnet101_2().double().state_dict()
    torch.save(sd, f"{out}/wide_resnet101_2_f64.pth")
PY
cargo build --release --quiet --example load_checkpoint --bin residual --bin residual-inspect
bin=target/release/examples/load_checkpoint
[[ -f $dir/bomb.pth ]] || $bin --write-bomb "$dir/bomb.pth"

# PyTorch's side: ARCH FILE [NUM_CLASSES]; prints the best time and the largest peak of 3 loads.
torch_load() {
  $python - "$@" <<'PY'
import gc, sys, time, torch, torchvision
from safetensors.torch import load_file
arch, path = sys.argv[1], sys.argv[2]
kwargs = {"num_classes": int(sys.argv[3])} if len(sys.argv) > 3 else {}
model = getattr(torchvision.models, arch)(**kwargs)
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
times, peaks, outcome = [], [], "model ready"
for _ in range(3):
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")
    base = kb("VmRSS:")
    start = time.perf_counter()
    try:
        sd = torch.load(path, weights_only=True) if path.endswith(".pth") else load_file(path)
        model.load_state_dict(sd)
    except RuntimeError as e:
        outcome = "refused (" + str(e).splitlines()[0] + ")"
    times.append(time.perf_counter() - start)
    peaks.append((kb("VmHWM:") - base) / 1024)
    sd = None
what = "torch.load" if path.endswith(".pth") else "safetensors load_file"
print(f"{path} -> {arch}: PyTorch ({what} + load_state_dict): {outcome} in {min(times):.3f} s, "
      f"peak RSS +{max(peaks):.0f} MB")
PY
}

# The figures of a line: "in T s, peak RSS +M MB".
figures() { sed -E 's/.* in ([0-9.]+) s, peak RSS \+([0-9]+) MB.*/\1 \2/'; }

echo "== model ready (strict load), page cache warm"
for arch in resnet50 resnet152; do
  for ext in pth safetensors; do
    f=$dir/$arch.$ext
    cat "$f" > /dev/null
    ours=$($bin "$f" --arch "$arch" --repeat 3)
    theirs=$(torch_load "$arch" "$f")
    echo "  $ours"
    echo "  $theirs"
    read -r t1 m1 <<< "$(figures <<< "$ours")"
    read -r t2 m2 <<< "$(figures <<< "$theirs")"
    weights=$(sed -E 's/.*weights ([0-9]+) MB.*/\1/' <<< "$ours")
    awk -v t1="$t1" -v t2="$t2" -v m1="$m1" -v w="$weights" 'BEGIN {
      printf "  -> time %.2f x PyTorch'"'"'s, peak RSS %.2f x the weights'"'"' bytes\n", t1 / t2, m1 / w }'
  done
done

echo "== inspect of a 1 GB checkpoint"
f=$dir/wide_resnet101_2_f64.pth
cat "$f" > /dev/null
echo "  $($bin "$f" --inspect)"
# Best wall time of 5 runs of a command, in ms.
best_ms() {
  local best=
  for _ in 1 2 3 4 5; do
    local start end
    start=$(date +%s%N)
    "$@" > /dev/null
    end=$(date +%s%N)
    local ms=$(( (end - start) / 1000000 ))
    if [[ -z $best || $ms -lt $best ]]; then best=$ms; fi
  done
  echo "$best"
}
echo "  whole process, best of 5: residual inspect $(best_ms target/release/residual inspect "$f") ms;" \
  "residual --version (libtorch loaded, nothing done) $(best_ms target/release/residual --version) ms;" \
  "residual-inspect (no libtorch) $(best_ms target/release/residual-inspect "$f") ms;" \
  "residual inspect --check $(best_ms target/release/residual inspect --check "$f") ms"

echo "== refused before allocating"
echo "  $($bin "$dir/bomb.pth" --arch resnet18)"
echo "  $($bin "$dir/bomb.pth" --inspect)"
echo "  $($bin "$f" --arch '{"arch": "wide_resnet101_2", "num_classes": 10}')"
echo "  $(torch_load wide_resnet101_2 "$f" 10)"
