"""A tiny image-folder dataset and torchvision's view of it, for tests/image_folder.rs.

`python python_ref/image_folder.py DIR` writes into DIR:
  data/<class>/...           class folders in an order that tests the sorting (upper case before
                             lower, nested folders, upper-case extensions, a file torchvision
                             ignores, a corrupt PNG), images in every PIL mode `convert("RGB")`
                             handles differently (RGB, L, RGBA, P, LA), a lossless WebP and a JPEG
                             with EXIF orientation 6 (rotated by 90 degrees)
  expected.json              `ImageFolder(DIR/data)`'s classes and samples (paths relative to
                             DIR/data, targets), the corrupt file, and the fixed crops below
                             and RandomResizedCrop.get_params' mean area share, log aspect
                             ratio, offsets and share of whole-image crops over 20000 draws
  augment/                   python_ref/augment.py's references (TrivialAugment, RandAugment and
                             ColorJitter ops)
  expected.safetensors       per sample i (readable ones): `decoded.<i>`, uint8 [H, W, 3]:
                             `ImageOps.exif_transpose(Image.open(p)).convert("RGB")`;
                             `eval.<i>`: `Resize(11)` then `CenterCrop(9)` on that PIL image;
                             `crop.<i>`: `F.resized_crop(img, top, left, h, w, [7, 6])` (bilinear,
                             PIL) with the sample's crop from expected.json
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torchvision import datasets, transforms
from torchvision.transforms import functional as F

import augment


def write_tree(root: str) -> str:
    rng = np.random.default_rng(7)

    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")

    files = {
        "cat/01.png": rgb(13, 17),
        "cat/nested/deep/02.PNG": rgb(20, 9),
        "cat/nested-b/03.png": rgb(16, 16).convert("L"),
        "cat/nested/04.png": rgb(15, 22).convert("RGBA"),
        "Dog/a.png": rgb(18, 14).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "Dog/b.webp": rgb(12, 19),
        "Dog/c.png": rgb(21, 11).convert("LA"),
        "bird/x.jpg": rgb(24, 16),
        "bird/y.png": rgb(10, 10),
    }
    data = os.path.join(root, "data")
    for name, image in files.items():
        path = os.path.join(data, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if name.endswith(".webp"):
            image.save(path, lossless=True)
        elif name.endswith(".jpg"):
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(path, quality=95, exif=exif)
        else:
            image.save(path)
    with open(os.path.join(data, "bird", "notes.txt"), "w") as f:
        f.write("not an image\n")
    with open(os.path.join(data, "bird", "z_corrupt.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return data


def main() -> None:
    root = sys.argv[1]
    data = write_tree(root)
    augment.write(os.path.join(root, "augment"))
    dataset = datasets.ImageFolder(data)
    samples, tensors, crops = [], {}, []
    corrupt = None
    for i, (path, target) in enumerate(dataset.samples):
        rel = os.path.relpath(path, data)
        samples.append([rel, target])
        try:
            with open(path, "rb") as f:
                image = ImageOps.exif_transpose(Image.open(f)).convert("RGB")
        except Exception:
            corrupt = rel
            continue
        w, h = image.size
        top, left, ch, cw = i % 3, (2 * i) % 4, h - 4, w - 5
        crops.append({"index": i, "top": top, "left": left, "height": ch, "width": cw})
        as_array = lambda im: torch.from_numpy(np.asarray(im).copy())
        tensors[f"decoded.{i}"] = as_array(image)
        eval_tf = transforms.Compose([transforms.Resize(11), transforms.CenterCrop(9)])
        tensors[f"eval.{i}"] = as_array(eval_tf(image))
        tensors[f"crop.{i}"] = as_array(F.resized_crop(image, top, left, ch, cw, [7, 6]))
    save_file(tensors, os.path.join(root, "expected.safetensors"))
    # RandomResizedCrop.get_params' statistics on a 30x50 image (torchvision's defaults).
    torch.manual_seed(0)
    draws = [
        transforms.RandomResizedCrop.get_params(torch.empty(3, 30, 50), [0.08, 1.0], [3 / 4, 4 / 3])
        for _ in range(20000)
    ]
    params = np.array(draws, dtype=np.float64)
    top, left, h, w = params.T
    rrc = {
        "mean_area": float((h * w / 1500).mean()),
        "mean_log_ratio": float(np.log(w / h).mean()),
        "mean_top": float(top.mean()),
        "mean_left": float(left.mean()),
        "full": float(((h == 30) & (w == 50)).mean()),
    }
    with open(os.path.join(root, "expected.json"), "w") as f:
        json.dump(
            {
                "classes": dataset.classes,
                "samples": samples,
                "corrupt": corrupt,
                "crops": crops,
                "random_resized_crop": rrc,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
