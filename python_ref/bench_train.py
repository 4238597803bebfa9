"""Training throughput, PyTorch eager vs residual, side by side in one run.

Usage: python python_ref/bench_train.py [--depth 20] [--batch-size 128] [--steps 30] [--warmup 5]
                                        [--device cpu] [--residual target/release/residual]

Both time the same loop on the same model (the paper's CIFAR ResNet, 1x28x28 inputs, 10 classes):
forward in training mode, cross-entropy, backward, SGD step (momentum 0.9, weight decay 1e-4), on a
fixed random batch, with the same number of threads and the same libtorch switches (on CUDA: TF32
off, cuDNN benchmark on, nothing deterministic; `residual bench-train` reports its own, checked
here). Prints images/s for each and the ratio.
"""

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import resnet_ref as RR


def pytorch_images_per_second(depth, batch, steps, warmup, device):
    torch.manual_seed(0)
    model = RR.CifarResNet(depth, 10, "A", False, 1).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def same_switches():
    """Sets the libtorch switches residual bench-train runs with, and returns them as it reports
    them."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    return {"tf32_cudnn": False, "tf32_cublas": False, "cudnn_benchmark": True, "cudnn_deterministic": False,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def compare(depth=20, batch=128, steps=30, warmup=5, device="cpu", rounds=3, residual="target/release/residual"):
    """Images/s of the training step, PyTorch eager and `residual bench-train` alternating `rounds`
    times; the best of each and their ratio."""
    ours = same_switches()
    threads = torch.get_num_threads()
    rust_cmd = [residual, "bench-train", "--arch", f"cifar_resnet{depth}", "--batch-size", str(batch),
                "--steps", str(steps), "--warmup", str(warmup), "--device", device, "--json"]
    torch_runs, rust_runs = [], []
    for _ in range(rounds):
        torch_runs.append(pytorch_images_per_second(depth, batch, steps, warmup, device))
        out = subprocess.run(rust_cmd, check=True, capture_output=True, text=True)
        report = json.loads(out.stdout)
        theirs = {k: v for k, v in report["switches"].items() if k != "autocast"}
        if theirs != ours:
            sys.exit(f"residual bench-train ran with {theirs}, PyTorch with {ours}")
        if report["threads"] != threads:
            sys.exit(f"residual bench-train ran with {report['threads']} threads, PyTorch with {threads}")
        rust_runs.append(report["images_per_second"])
    t, r = max(torch_runs), max(rust_runs)
    return {"model": f"cifar_resnet{depth}", "batch": batch, "device": device, "threads": threads,
            "pytorch_images_per_second": t, "residual_images_per_second": r, "ratio_residual_over_pytorch": r / t,
            "pytorch_runs": torch_runs, "residual_runs": rust_runs}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="alternate the two this many times")
    p.add_argument("--residual", default="target/release/residual")
    a = p.parse_args()
    result = compare(a.depth, a.batch_size, a.steps, a.warmup, a.device, a.rounds, a.residual)
    r, t = result["residual_images_per_second"], result["pytorch_images_per_second"]
    print(json.dumps(result, indent=1))
    print(f"residual / PyTorch = {r / t:.3f} ({r:.0f} vs {t:.0f} images/s, best of {a.rounds})", file=sys.stderr)

if __name__ == "__main__":
    main()
