"""References for `residual probe gradients`: PyTorch's gradient norms for tiny CIFAR nets.

Writes into OUT/probe/, for a residual and a plain CIFAR ResNet-14 (option A, 1 input channel,
3 classes) in training mode (batch statistics), the loss `F.cross_entropy(model(x), y)` (mean):
  cifar14_{residual,plain}.safetensors   the state_dict
  cifar14_{residual,plain}_input.safetensors   `x` [6, 1, 8, 8], `y` [6] (int64)
  cifar14_{residual,plain}.json          the loss and the L2 norms of dL/d(output) of the stem
                                         and each block and of dL/d(weight) of every conv and fc,
                                         input side first (the Rust probe's order and names)
About 1.4 MB in all. Run alone: `python python_ref/probe_cases.py --out DIR`.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import resnet_ref as RR


def probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    outputs = []
    names = []

    def keep(name):
        def hook(_module, _inputs, out):
            names.append(name)
            outputs.append(out)
        return hook

    handles = [model.relu.register_forward_hook(keep("stem"))]
    for s in (1, 2, 3):
        for i, block in enumerate(getattr(model, f"layer{s}")):
            handles.append(block.register_forward_hook(keep(f"layer{s}.{i}")))
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    # The stem's ReLU module runs once per block too (torchvision reuses `self.relu`); only its
    # first call, in the stem, is the stem's output.
    first = names.index("stem")
    stem_out = outputs[first]
    blocks = [(n, o) for n, o in zip(names, outputs) if n != "stem"]
    weights = [(k, p) for k, p in model.named_parameters() if k.endswith("weight") and p.dim() > 1]
    grads = torch.autograd.grad(loss, [stem_out] + [o for _, o in blocks] + [p for _, p in weights])
    norm = lambda g: float(g.double().norm())
    n_out = 1 + len(blocks)
    return {
        "loss": float(loss.detach()),
        "outputs": [{"name": n, "norm": norm(g)} for n, g in zip(["stem"] + [n for n, _ in blocks], grads[:n_out])],
        "weights": [{"name": k, "norm": norm(g)} for (k, _), g in zip(weights, grads[n_out:])],
    }


def export_probe(out_dir: str) -> dict:
    out = os.path.join(out_dir, "probe")
    os.makedirs(out, exist_ok=True)
    for plain in (False, True):
        torch.manual_seed(1212 + plain)
        model = RR.CifarResNet(14, 3, "A", plain, 1).train()
        with torch.no_grad():
            # Batch-norm affine values away from 1 / 0, so that they matter.
            for k, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.rand_like(p) + 0.5 if k.endswith("weight") else torch.rand_like(p) - 0.5)
        x = torch.randn(6, 1, 8, 8)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        name = f"cifar14_{'plain' if plain else 'residual'}"
        result = probe(model, x, y)
        save_file(state, os.path.join(out, f"{name}.safetensors"))
        save_file({"x": x, "y": y}, os.path.join(out, f"{name}_input.safetensors"))
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return {"probe": "probe", "probe_cases": 2}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="writes the gradient-probe references only")
    parser.add_argument("--out", default="target/python_ref")
    export_probe(parser.parse_args().out)
