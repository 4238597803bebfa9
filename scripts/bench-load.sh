#!/usr/bin/env bash
# Load time and peak memory of a resnet152 checkpoint, .pth (torch.save) vs .safetensors, in
# residual (examples/load_checkpoint) and in PyTorch (torch.load / safetensors.torch.load_file).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
dir=target/bench
mkdir -p "$dir"
if [[ ! -f $dir/resnet152.pth ]]; then
  $python - "$dir" <<'PY'
import sys, torch, torchvision
from safetensors.torch import save_file
sd = torchvision.models.resnet152().state_dict()
torch.save(sd, f"{sys.argv[1]}/resnet152.pth")
save_file({k: v.contiguous() for k, v in sd.items()}, f"{sys.argv[1]}/resnet152.safetensors")
PY
fi
cargo build --release --quiet --example load_checkpoint   # timings of a debug build mislead
for f in "$dir/resnet152.pth" "$dir/resnet152.safetensors"; do
  sync; cat "$f" > /dev/null   # warm page cache: measure parsing, not the disk
  /usr/bin/time -f "  residual peak RSS %M KB, wall %e s" target/release/examples/load_checkpoint "$f"
  $python - "$f" <<'PY'
import resource, sys, time
import torch
from safetensors.torch import load_file
path = sys.argv[1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.time()
state = torch.load(path, weights_only=True) if path.endswith(".pth") else load_file(path)
elapsed = time.time() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"  PyTorch  load {elapsed:.3f} s, peak RSS {peak} KB ({peak - base} KB above `import torch`)")
PY
done
