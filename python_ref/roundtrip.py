"""PyTorch's side of the checkpoint round-trip tests.

  roundtrip.py check ARCH FILE REFERENCE.safetensors
      torch.load(FILE, weights_only=True), load it strictly into torchvision's ARCH, and require
      every tensor to equal REFERENCE bit for bit. Exit 0 when all hold.
  roundtrip.py resave FILE OUT
      torch.load(FILE, weights_only=True) and torch.save it again to OUT.
"""

import sys

import torch
import torchvision.models as tvm
from safetensors.torch import load_file


def check(arch: str, path: str, reference: str) -> int:
    sd = torch.load(path, weights_only=True)
    model = getattr(tvm, arch)()
    model.load_state_dict(sd, strict=True)
    ref = load_file(reference)
    if set(ref) != set(sd):
        print(f"keys differ: {sorted(set(ref) ^ set(sd))[:5]}")
        return 1
    for k, v in ref.items():
        if sd[k].dtype != v.dtype or sd[k].shape != v.shape or not torch.equal(sd[k], v):
            print(f"{k}: differs")
            return 1
    print(f"ok: {len(sd)} tensors equal, strict load into {arch} accepted")
    return 0


def resave(path: str, out: str) -> int:
    torch.save(torch.load(path, weights_only=True), out)
    return 0


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    sys.exit({"check": check, "resave": resave}[cmd](*args))
