"""Images per second of the image-folder training input pipeline: residual's (worker threads,
examples/bench_pipeline.rs) against PyTorch's `DataLoader(num_workers=2)` with torchvision's
`ImageFolder` and `RandomResizedCrop(size)`, `RandomHorizontalFlip()`, `ToTensor()`,
`Normalize(ImageNet)`, on the same folder of real images. Only the pipeline is timed (no model),
from the first batch to the end of the epoch; the two alternate `--rounds` times and the best
epoch of each is reported, with the ratio. `--trivial-augment` also times both with
`TrivialAugmentWide()` after the flip, in the same rounds, and reports what it costs each side.

The folder (`--folder`, made when missing): Fashion-MNIST training images from
/usr/share/datasets/fashion-mnist, upscaled (bicubic) to `--source-size` and saved as RGB, half
as PNG and half as JPEG (quality 90), in one folder per class.

    python python_ref/bench_pipeline.py --residual-bench target/release/examples/bench_pipeline
"""

import argparse
import gzip
import json
import os
import subprocess
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

FASHION = "/usr/share/datasets/fashion-mnist"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "boot"]


def make_folder(folder: str, count: int, side: int) -> None:
    with gzip.open(os.path.join(FASHION, "train-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FASHION, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    for name in CLASSES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(count):
        image = Image.fromarray(images[i]).resize((side, side), Image.BICUBIC).convert("RGB")
        stem = os.path.join(folder, CLASSES[labels[i]], f"{i:05d}")
        if i % 2:
            image.save(stem + ".jpg", quality=90)
        else:
            image.save(stem + ".png")


def torch_epoch(folder: str, size: int, batch: int, workers: int, trivial: bool = False) -> float:
    augment = [transforms.TrivialAugmentWide()] if trivial else []
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size),
        transforms.RandomHorizontalFlip(),
        *augment,
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    loader = DataLoader(datasets.ImageFolder(folder, tf), batch_size=batch, shuffle=True,
                        num_workers=workers)
    it = iter(loader)
    next(it)
    start, images = time.perf_counter(), 0
    for x, _ in it:
        images += x.shape[0]
    return images / (time.perf_counter() - start)


def residual_epoch(binary: str, folder: str, size: int, batch: int, workers: int,
                   trivial: bool = False) -> float:
    args = [binary, folder, str(size), str(batch), str(workers)] + (["1", "trivial"] if trivial else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--residual-bench", default="target/release/examples/bench_pipeline")
    p.add_argument("--folder", default="target/bench-pipeline/fashion-rgb")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--trivial-augment", action="store_true")
    a = p.parse_args()
    if not os.path.isdir(a.folder):
        make_folder(a.folder, a.images, a.source_size)
    torch.set_num_threads(1)
    best = {"pytorch": 0.0, "residual": 0.0, "pytorch_ta": 0.0, "residual_ta": 0.0}
    run = (a.folder, a.size, a.batch_size, a.workers)
    for r in range(a.rounds):
        got = {"pytorch": torch_epoch(*run), "residual": residual_epoch(a.residual_bench, *run)}
        if a.trivial_augment:
            got["pytorch_ta"] = torch_epoch(*run, trivial=True)
            got["residual_ta"] = residual_epoch(a.residual_bench, *run, trivial=True)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f} images/s" for k, v in got.items()))
        best = {k: max(v, got.get(k, 0.0)) for k, v in best.items()}
    ratio = best["residual"] / best["pytorch"]
    result = {"folder": a.folder, "size": a.size, "batch_size": a.batch_size,
              "workers": a.workers, "pytorch_images_per_second": round(best["pytorch"], 1),
              "residual_images_per_second": round(best["residual"], 1),
              "ratio": round(ratio, 3)}
    if a.trivial_augment:
        result["trivial_augment"] = {
            "pytorch_images_per_second": round(best["pytorch_ta"], 1),
            "residual_images_per_second": round(best["residual_ta"], 1),
            "ratio": round(best["residual_ta"] / best["pytorch_ta"], 3),
            # Throughput lost to TrivialAugmentWide on each side.
            "pytorch_cost": round(1 - best["pytorch_ta"] / best["pytorch"], 3),
            "residual_cost": round(1 - best["residual_ta"] / best["residual"], 3),
        }
    print(json.dumps(result))
    print(f"residual / PyTorch DataLoader(num_workers={a.workers}): {ratio:.2f}x")
    if a.trivial_augment:
        t = result["trivial_augment"]
        print(f"with TrivialAugmentWide: {t['ratio']:.2f}x; it costs PyTorch "
              f"{100 * t['pytorch_cost']:.0f}% and residual {100 * t['residual_cost']:.0f}% "
              "of their throughput")


if __name__ == "__main__":
    main()
