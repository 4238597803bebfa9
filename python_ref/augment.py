"""torchvision's automatic-augmentation ops and ColorJitter's hue on tiny PIL images, for
tests/image_folder/augment.rs (python_ref/image_folder.py calls `write(DIR/augment)`, saving the
tests a second Python start).

`python python_ref/augment.py DIR` (or `write(DIR)`) writes into DIR:
  expected.safetensors  `input.<name>`: uint8 [H, W, 3] images (`rect` 13x17 and `square` 12x12,
                        values in 30..220 so that AutoContrast and Equalize change them);
                        `<key>`: each case's output, uint8 [H, W, 3]
  expected.json         `cases`: {image, op, magnitude, key}: torchvision's `_apply_op(img, op,
                        magnitude, NEAREST, fill=None)` on the PIL image, for TrivialAugmentWide's
                        bins 0, 5, 17, 20 and 30 and RandAugment's bin 9, both signs where signed;
                        `hue`: {factor, key}: `F.adjust_hue`; `brightness`, `contrast`,
                        `saturation`: {factor, key}: the other ColorJitter ops;
                        `tables`: each policy's magnitude table (`_augmentation_space`) for `rect`
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode, RandAugment, TrivialAugmentWide
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op


def write(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(11)
    images = {
        "rect": rng.integers(30, 221, (13, 17, 3), dtype=np.uint8),
        "square": rng.integers(30, 221, (12, 12, 3), dtype=np.uint8),
    }
    tensors = {f"input.{k}": torch.from_numpy(v.copy()) for k, v in images.items()}
    pil = {k: Image.fromarray(v, "RGB") for k, v in images.items()}
    as_tensor = lambda im: torch.from_numpy(np.asarray(im).copy())
    ta = TrivialAugmentWide()._augmentation_space(31)
    cases = []
    for name, image in pil.items():
        h, w = images[name].shape[:2]
        ra = RandAugment()._augmentation_space(31, (h, w))
        for policy, space, bins in (("ta", ta, [0, 5, 17, 20, 30]), ("ra", ra, [9])):
            for op, (magnitudes, signed) in space.items():
                for b in bins if magnitudes.ndim > 0 else [None]:
                    m = float(magnitudes[b].item()) if b is not None else 0.0
                    for sign in (1.0, -1.0) if signed else (1.0,):
                        key = f"{name}.{policy}.{op}.{b}.{sign:+.0f}"
                        if any(c["key"] == key for c in cases):
                            continue
                        o = _apply_op(image, op, sign * m, InterpolationMode.NEAREST, None)
                        tensors[key] = as_tensor(o)
                        cases.append({"image": name, "op": op, "magnitude": sign * m, "key": key})
    colour = {}
    for fn, factors in (
        ("hue", [-0.5, -0.31, -0.05, 0.0, 0.1, 0.27, 0.5]),
        ("brightness", [0.35, 1.6]),
        ("contrast", [0.35, 1.6]),
        ("saturation", [0.0, 0.35, 1.6]),
    ):
        colour[fn] = []
        for f in factors:
            key = f"rect.{fn}.{f}"
            tensors[key] = as_tensor(getattr(F, f"adjust_{fn}")(pil["rect"], f))
            colour[fn].append({"factor": f, "key": key})
    h, w = images["rect"].shape[:2]
    tables = {}
    for policy, space in (("ta", ta), ("ra", RandAugment()._augmentation_space(31, (h, w)))):
        tables[policy] = {op: m.tolist() for op, (m, _) in space.items() if m.ndim > 0}
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"cases": cases, "tables": tables, **colour}, f)


if __name__ == "__main__":
    write(sys.argv[1])
