"""Checkpoint fixtures for the reader tests: the same weights as PyTorch users save them.

Writes into OUT/checkpoints/: resnet50 as a plain state_dict (.pth, zip format), in the legacy
pre-1.6 format, wrapped in a training checkpoint with DataParallel prefixes, as a Lightning
checkpoint, after torch.compile, as an EMA entry, in half precision, and as safetensors; the input
and PyTorch's logits for each; and a file of every dtype and tensor layout (views, offsets,
transposes, scalars, empty tensors) with a safetensors copy of the same values.
"""

import os
from collections import OrderedDict

import torch
import torchvision.models as tvm
from safetensors.torch import save_file

from resnet_cases import randomize_norm_state


def export_checkpoints(out_dir: str) -> dict:
    out = os.path.join(out_dir, "checkpoints")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234)
    model = randomize_norm_state(tvm.resnet50()).eval()
    sd = model.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)

    def path(name):
        return os.path.join(out, name)

    torch.save(sd, path("resnet50.pth"))
    torch.save(sd, path("resnet50_legacy.pth"), _use_new_zipfile_serialization=False)
    torch.save(
        {
            "epoch": 7,
            "arch": "resnet50",
            "state_dict": OrderedDict(("module." + k, v) for k, v in sd.items()),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]},
            "best_acc1": torch.tensor(76.1),
        },
        path("resnet50_wrapped_ddp.pth"),
    )
    torch.save(
        {"state_dict": OrderedDict(("model." + k, v) for k, v in sd.items()),
         "pytorch-lightning_version": "2.4.0", "global_step": 1000},
        path("resnet50_lightning.ckpt"),
    )
    torch.save(OrderedDict(("_orig_mod." + k, v) for k, v in sd.items()), path("resnet50_compiled.pth"))
    torch.save({"model": {"not": "weights"}, "ema": sd}, path("resnet50_ema.pth"))
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in sd.items())
    torch.save(half, path("resnet50_half.pth"))
    save_file({k: v.contiguous() for k, v in sd.items()}, path("resnet50.safetensors"))

    half_model = tvm.resnet50().eval()
    half_model.load_state_dict(half)  # PyTorch converts to the model's fp32
    with torch.no_grad():
        half_logits = half_model(x)
    save_file({"input": x, "logits": logits, "logits_from_half": half_logits}, path("resnet50_io.safetensors"))

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    layouts = OrderedDict(
        f64=torch.randn(3, 2, dtype=torch.float64),
        f32=torch.randn(5),
        f16=torch.randn(2, 3).half(),
        bf16=torch.randn(2, 3).bfloat16(),
        i64=torch.tensor([-(2**40), 0, 2**40]),
        i32=torch.tensor([-7, 0, 7], dtype=torch.int32),
        i16=torch.tensor([-300, 300], dtype=torch.int16),
        i8=torch.tensor([-128, 127], dtype=torch.int8),
        u8=torch.tensor([0, 255], dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        base=base,
        transposed=base.t(),
        row=base[2],
        column=base[:, 1],
        strided=base[::2, 1::2],
    )
    torch.save(layouts, path("layouts.pth"))
    torch.save(layouts, path("layouts_legacy.pth"), _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous().clone() for k, v in layouts.items()}, path("layouts.safetensors"))
    export_images(out, model)
    return {"checkpoints": "checkpoints", "resnet50_input": list(x.shape)}


def export_images(out: str, model: torch.nn.Module) -> None:
    """A PNG and a JPEG, and torchvision's ImageNet evaluation preprocessing of the PNG
    (`ResNet50_Weights.IMAGENET1K_V1.transforms()`: resize 256 antialiased, crop 224, normalise)."""
    from torchvision.io import decode_image, write_jpeg, write_png

    g = torch.Generator().manual_seed(99)
    h, w = 300, 420
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([xx, yy, (xx + yy) / 2]) * 200
    noise = torch.rand(3, h, w, generator=g) * 55
    image = (smooth + noise).clamp(0, 255).to(torch.uint8)
    write_png(image, os.path.join(out, "image.png"))
    write_jpeg(image, os.path.join(out, "image.jpg"), quality=95)
    transform = tvm.ResNet50_Weights.IMAGENET1K_V1.transforms()
    decoded = decode_image(os.path.join(out, "image.png"))
    pixels = transform(decoded).contiguous()
    with torch.no_grad():
        logits = model(pixels[None])[0]
    save_file({"image": pixels, "logits": logits}, os.path.join(out, "image_preprocessed.safetensors"))
