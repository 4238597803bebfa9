"""The fine-tuning demonstration's PyTorch half (`make finetune-demo`).

  pretrain    trains torchvision's resnet18 (5 classes) on Fashion-MNIST classes 0-4 (T-shirt/top,
              Trouser, Pullover, Dress, Coat) at 3x32x32, seeded, and saves its state_dict: the
              checkpoint `residual train --init-weights` starts from.
  folder      writes Fashion-MNIST classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) as PNG
              files into train/<class>/ and val/<class>/ (from the training and the test images):
              the image folder the fine-tuning trains on.
  throughput  images/s of one resnet18 training step (forward, cross-entropy, backward, SGD with
              momentum 0.9 and weight decay 1e-4) on a fixed 64x3x32x32 batch, PyTorch eager and
              `residual bench-train` alternating, same threads; prints both and the ratio.

The pretraining sees the images as the Rust run will: grayscale repeated to 3 channels, 28x28
resized to 32x32 (bilinear, antialiased), ImageNet's mean and std.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data, split):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data, f"{prefix}-labels-idx1-ubyte.gz"))
    return images, labels


def pick(images, labels, classes, per_class, seed):
    """`per_class` images of each of `classes` (seeded draw), relabelled 0..len(classes)-1."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for new, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        idx = rng.permutation(idx)[:per_class]
        xs.append(images[idx])
        ys.append(np.full(len(idx), new))
    return np.concatenate(xs), np.concatenate(ys)


def to_input(images, size=32):
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x.repeat(1, 3, 1, 1) - MEAN) / STD


def pretrain(a):
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    images, labels = load(a.data, "train")
    xs, ys = pick(images, labels, range(5), a.per_class, a.seed)
    x, y = to_input(xs), torch.from_numpy(ys).long()
    model = torchvision.models.resnet18(num_classes=5)
    steps = a.epochs * (len(x) // a.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps)
    start = time.time()
    model.train()
    for epoch in range(a.epochs):
        perm = torch.randperm(len(x))
        for b in range(len(x) // a.batch_size):
            i = perm[b * a.batch_size:(b + 1) * a.batch_size]
            xb = x[i]
            flip = torch.rand(len(i)) < 0.5
            xb[flip] = xb[flip].flip(3)
            loss = F.cross_entropy(model(xb), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"pretrain epoch {epoch + 1}/{a.epochs}: loss {loss.item():.3f} ({time.time() - start:.0f}s)",
              file=sys.stderr)
    model.eval()
    timages, tlabels = load(a.data, "test")
    tx, ty = pick(timages, tlabels, range(5), 200, a.seed)
    with torch.no_grad():
        acc = (model(to_input(tx)).argmax(1).numpy() == ty).mean()
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    torch.save(model.state_dict(), a.out)
    print(f"pretrained resnet18 on classes 0-4 ({len(x)} images, {a.epochs} epochs, {time.time() - start:.0f}s): "
          f"test accuracy {100 * acc:.1f}% on 1000 test images; saved {a.out}", file=sys.stderr)


def folder(a):
    from PIL import Image
    for split, per_class, source in [("train", a.train_per_class, "train"), ("val", a.val_per_class, "test")]:
        images, labels = load(a.data, source)
        xs, ys = pick(images, labels, range(5, 10), per_class, a.seed)
        counts = {}
        for img, y in zip(xs, ys):
            name = CLASSES[5 + y]
            d = os.path.join(a.out, split, name)
            os.makedirs(d, exist_ok=True)
            counts[name] = counts.get(name, 0) + 1
            Image.fromarray(img, mode="L").save(os.path.join(d, f"{counts[name]:05d}.png"))
    print(f"wrote {a.train_per_class}+{a.val_per_class} PNGs per class of {', '.join(CLASSES[5:])} into "
          f"{a.out}/train and {a.out}/val", file=sys.stderr)


def pytorch_step_rate(batch, steps, warmup):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 5, (batch,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return batch * steps / (time.perf_counter() - start)


def throughput(a):
    config = os.path.join(os.path.dirname(a.out) or ".", "resnet18_5.json")
    os.makedirs(os.path.dirname(config) or ".", exist_ok=True)
    with open(config, "w") as f:
        json.dump({"arch": "resnet18", "num_classes": 5}, f)
    threads = torch.get_num_threads()
    cmd = [a.residual, "bench-train", "--config", config, "--image-size", "32", "--batch-size",
           str(a.batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", "cpu", "--json"]
    torch_runs, rust_runs = [], []
    for _ in range(a.rounds):
        torch_runs.append(pytorch_step_rate(a.batch_size, a.steps, a.warmup))
        report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        if report["threads"] != threads:
            sys.exit(f"residual bench-train ran with {report['threads']} threads, PyTorch with {threads}")
        rust_runs.append(report["images_per_second"])
    t, r = max(torch_runs), max(rust_runs)
    result = {"model": "torchvision resnet18, 5 classes, 3x32x32", "batch": a.batch_size, "threads": threads,
              "residual_binary": a.residual, "pytorch_images_per_second": t, "residual_images_per_second": r,
              "ratio_residual_over_pytorch": r / t, "pytorch_runs": torch_runs, "residual_runs": rust_runs}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"training step, resnet18 at 3x32x32, batch {a.batch_size}, {threads} threads: residual {r:.0f} images/s, "
          f"PyTorch {t:.0f} images/s, ratio {r / t:.2f} (best of {a.rounds}; {a.out})")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pretrain")
    s.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=1200)
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=0.05)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("folder")
    s.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    s.add_argument("--out", required=True)
    s.add_argument("--train-per-class", type=int, default=400)
    s.add_argument("--val-per-class", type=int, default=200)
    s.add_argument("--seed", type=int, default=1)
    s = sub.add_parser("throughput")
    s.add_argument("--residual", default="target/release/residual")
    s.add_argument("--out", required=True)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    {"pretrain": pretrain, "folder": folder, "throughput": throughput}[a.command](a)


if __name__ == "__main__":
    main()
