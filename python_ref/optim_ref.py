"""SGD, gradient clipping and weight EMA for tests/optim.rs: `python python_ref/optim_ref.py
OUT.safetensors` writes, on tiny tensors,

- `torch.optim.SGD` (momentum 0.9, weight decay 0.01, dampening 0) for 5 steps with fixed gradients
  and a changing rate, plain (`sgd.*`) and with nesterov=True (`nesterov.*`): the initial
  parameters (`init.<name>`), each step's gradients (`grad.<k>.<name>`) and rate (`lr`), and the
  parameters and momentum buffers after the last step (`<case>.final.<name>`,
  `<case>.buf.<name>`);
- `torch.nn.utils.clip_grad_norm_` of step k's gradients (`clip.<case>.<name>`, total norm
  `clip.<case>.total`) for max_norm 1 with norm type 2 and inf on steps 0 and 4 (steps 0's are
  below the limit, steps 4's above), and `clip_grad_value_(0.5)` of step 4's (`clip.value.<name>`);
- timm's `ModelEmaV3` over 4 SGD steps of a conv + BatchNorm + linear net: the model's state_dict
  after each step (`ema_in.<k>.<key>`, BatchNorm's buffers included) and the EMA's state_dict after
  `update(model, step=k + 1)` on each, with decay 0.9 (`ema.<key>`) and with decay 0.999 and
  warmup (`ema_warmup.<key>`).
"""

import sys

import torch
from safetensors.torch import save_file
from timm.utils.model_ema import ModelEmaV3

torch.manual_seed(0)
shapes = {"fc.weight": (4, 3), "fc.bias": (4,), "bn.weight": (5,)}
init = {n: torch.randn(s) for n, s in shapes.items()}
lrs = [1e-1, 8e-2, 5e-2, 5e-2, 2e-2]
grads = [{n: torch.randn(s) * (10.0 ** (k - 2)) for n, s in shapes.items()} for k in range(5)]
out = {f"init.{n}": t.clone() for n, t in init.items()}
out["lr"] = torch.tensor(lrs, dtype=torch.float64)
for k, g in enumerate(grads):
    for n, t in g.items():
        out[f"grad.{k}.{n}"] = t.clone()

for case, nesterov in [("sgd", False), ("nesterov", True)]:
    params = {n: t.clone().requires_grad_() for n, t in init.items()}
    opt = torch.optim.SGD(list(params.values()), lr=lrs[0], momentum=0.9, weight_decay=0.01,
                          nesterov=nesterov)
    for k, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in params.items():
            p.grad = grads[k][n].clone()
        opt.step()
    for n, p in params.items():
        out[f"{case}.final.{n}"] = p.detach().clone()
        out[f"{case}.buf.{n}"] = opt.state[p]["momentum_buffer"].clone()

for k in (0, 4):
    for norm_type, label in [(2.0, "2"), (float("inf"), "inf")]:
        params = {n: t.clone().requires_grad_() for n, t in init.items()}
        for n, p in params.items():
            p.grad = grads[k][n].clone()
        total = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, norm_type=norm_type)
        case = f"norm{label}_step{k}"
        out[f"clip.{case}.total"] = total.clone()
        for n, p in params.items():
            out[f"clip.{case}.{n}"] = p.grad.clone()
params = {n: t.clone().requires_grad_() for n, t in init.items()}
for n, p in params.items():
    p.grad = grads[4][n].clone()
torch.nn.utils.clip_grad_value_(list(params.values()), 0.5)
for n, p in params.items():
    out[f"clip.value.{n}"] = p.grad.clone()


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(2)
        self.fc = torch.nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


net = Net()
emas = {"ema": ModelEmaV3(net, decay=0.9), "ema_warmup": ModelEmaV3(net, decay=0.999,
                                                                   use_warmup=True)}
opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
for k in range(4):
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
    for key, t in net.state_dict().items():
        out[f"ema_in.{k}.{key}"] = t.clone()
    for ema in emas.values():
        ema.update(net, step=k + 1)
for label, ema in emas.items():
    for key, t in ema.module.state_dict().items():
        out[f"{label}.{key}"] = t.clone()
save_file(out, sys.argv[1])
