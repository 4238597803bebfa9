"""ResNet-50 speed on a GPU, PyTorch eager vs residual, in the same run on the same device.

Usage: python python_ref/bench_gpu.py --residual PATH [--device cuda] [--quick] [--steps N] [--warmup N]

Inference latency (eval, random weights and input) at batch 1 and 64 in fp32 and bf16 (autocast),
and training images/s at batch 256 in bf16 autocast with channels-last, SGD momentum 0.9. Both sides
run with the same switches, and the script fails unless residual reports the ones set here: TF32
off (cuDNN and cuBLAS), cuDNN benchmark on, no deterministic algorithms or cuDNN; autocast around
forward and loss only (backward and the SGD step outside it). Prints one JSON object: each figure
for both, the ratio residual / PyTorch (for latency, PyTorch / residual, so > 1 means residual is
faster) and the switches. `--quick` shrinks the batches and steps (for the CPU dry run).
"""

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    out.float().sum().item()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def amp_context(dtype, device):
    if dtype == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def torch_infer_ms(batch, dtype, size, steps, warmup, device):
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad(), amp_context(dtype, device):
        return 1e3 * timed(lambda: model(x), steps, warmup, device)


def torch_train_ips(batch, size, steps, warmup, device, amp, channels_last):
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)

    def step():
        with amp_context("bf16" if amp else "fp32", device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return batch / timed(step, steps, warmup, device)


def set_switches():
    """The switches both sides run with (residual's bench commands set the same ones)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)


def switches():
    return {"tf32_cudnn": torch.backends.cudnn.allow_tf32, "tf32_cublas": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def rust(residual, command, args, checked):
    """Runs `residual COMMAND`; fails unless it ran with the switches PyTorch runs with here."""
    out = subprocess.run([residual, command, "--arch", "resnet50", "--json", *args], check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout)
    theirs = {k: v for k, v in result["switches"].items() if k != "autocast"}
    if theirs != switches():
        sys.exit(f"residual {command} ran with {theirs}, PyTorch with {switches()}")
    checked[command] = result["switches"]
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--residual", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for the CPU dry run")
    p.add_argument("--steps", type=int, help="timed steps (default 30)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10)")
    a = p.parse_args()
    set_switches()
    checked = {}
    gpu = a.device.startswith("cuda")
    size, steps, warmup = (64, 2, 1) if a.quick else (224, 30, 10)
    steps, warmup = a.steps or steps, a.warmup or warmup
    results = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "image_size": size, "steps": steps,
               "warmup": warmup, "inference": [], "training": None}
    dtypes = ["fp32", "bf16"] if gpu else ["fp32"]
    for batch in ([1, 4] if a.quick else [1, 64]):
        for dtype in dtypes:
            t = torch_infer_ms(batch, dtype, size, steps, warmup, a.device)
            extra = ["--amp", "bf16"] if dtype == "bf16" else []
            r = rust(a.residual, "bench-infer", ["--batch-size", str(batch), "--image-size", str(size), "--steps", str(steps),
                                                 "--warmup", str(warmup), "--device", a.device, *extra], checked)["ms_per_batch"]
            results["inference"].append({"batch": batch, "dtype": dtype, "pytorch_ms": t, "residual_ms": r,
                                         "speed_ratio_residual_over_pytorch": t / r})
    batch = 8 if a.quick else 256
    t = torch_train_ips(batch, size, steps, warmup, a.device, amp=gpu, channels_last=True)
    extra = ["--amp", "bf16"] if gpu else []
    r = rust(a.residual, "bench-train", ["--batch-size", str(batch), "--image-size", str(size), "--steps", str(steps),
                                         "--warmup", str(warmup), "--device", a.device, "--channels-last", *extra],
             checked)["images_per_second"]
    results["training"] = {"batch": batch, "amp": "bf16" if gpu else None, "channels_last": True,
                           "pytorch_images_per_second": t, "residual_images_per_second": r,
                           "ratio_residual_over_pytorch": r / t}
    results["switches"] = {"pytorch": dict(switches(), autocast="training: forward and loss" if gpu else None),
                           "residual": checked}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
