"""`torch.optim.AdamW` for tests/optim.rs: `python python_ref/adamw_ref.py OUT.safetensors` runs 5
steps on three small parameters with fixed gradients and a changing rate, and saves the initial
parameters (`init.<name>`), each step's gradients (`grad.<k>.<name>`) and rate (`lr`), and the
parameters and moments after the last step (`final.<name>`, `exp_avg.<name>`, `exp_avg_sq.<name>`).
"""

import sys

import torch
from safetensors.torch import save_file

torch.manual_seed(0)
shapes = {"fc.weight": (4, 3), "fc.bias": (4,), "bn.weight": (5,)}
params = {n: torch.randn(s, requires_grad=True) for n, s in shapes.items()}
out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
opt = torch.optim.AdamW(list(params.values()), lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                        weight_decay=0.05)
lrs = [1e-2, 8e-3, 5e-3, 5e-3, 2e-3]
for k, lr in enumerate(lrs):
    for g in opt.param_groups:
        g["lr"] = lr
    for n, p in params.items():
        p.grad = torch.randn(p.shape) * (10.0 ** (k - 2))
        out[f"grad.{k}.{n}"] = p.grad.clone()
    opt.step()
for n, p in params.items():
    out[f"final.{n}"] = p.detach().clone()
    out[f"exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
    out[f"exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
out["lr"] = torch.tensor(lrs, dtype=torch.float64)
save_file(out, sys.argv[1])
