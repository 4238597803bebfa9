"""Checkpoint fixtures for the reader tests: the same weights as PyTorch users save them.

Writes into OUT/checkpoints/: resnet50 as a plain state_dict (.pth, zip format), in the legacy
pre-1.6 format, wrapped in a training checkpoint with DataParallel prefixes, as a Lightning
checkpoint, after torch.compile, as an EMA entry, in half precision, and as safetensors; the input
and PyTorch's logits for each; a file of every dtype and tensor layout (views, offsets,
transposes, scalars, empty tensors) with a safetensors copy of the same values; and the files
training scripts and `torch.save(model)` / `torch.jit.save` write (`export_training_checkpoints`).

Run alone, it writes only these fixtures: `python python_ref/checkpoints.py --out DIR`.
"""

import argparse
import copy
import os
from collections import OrderedDict

import torch
import torchvision.models as tvm
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import resnet_ref as RR
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
    export_training_checkpoints(out)
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


# --- What training scripts and whole-model saves write. ---------------------------------------------
# Each file below comes with `NAME.expected.pth`: `torch.save` of the state_dict PyTorch itself gives
# for the weights in it (`model.state_dict()`), which the reader must reproduce key for key, in order.
# The classes defined here stand for the user's and the libraries' own; the reader never imports
# them (their module is `checkpoints` or `__main__`, which the Rust side could not import anyway).


class AttributeDict(dict):
    """Lightning's `hyper_parameters` container (lightning.fabric.utilities.data.AttributeDict)."""

    def __getattr__(self, key):
        return self[key]


class Augmentation:
    """A user class among the hyper-parameters."""

    def __init__(self, mixup: float, policy: str):
        self.mixup = mixup
        self.policy = policy


class LitClassifier(nn.Module):
    """A LightningModule's layout: the network under `self.model`, a parameter-free loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.criterion = nn.CrossEntropyLoss()


class ModelEmaV2(nn.Module):
    """timm.utils.ModelEmaV2: a deep copy of the model under `self.module`."""

    def __init__(self, model: nn.Module, decay: float = 0.9998):
        super().__init__()
        self.module = copy.deepcopy(model)
        self.decay = decay


class TinyNet(nn.Module):
    """Everything `state_dict()` has rules for: a non-persistent buffer, None parameters, buffers and
    submodules (skipped), nested containers, a submodule shared under two names (saved once, listed
    twice), a frozen parameter and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("scale", torch.rand(4))
        self.register_buffer("mask", torch.ones(4), persistent=False)
        self.register_parameter("unused", None)
        self.register_buffer("absent", None)
        self.blocks = nn.Sequential(nn.BatchNorm2d(4), nn.Sequential(nn.Conv2d(4, 4, 1, bias=False)))
        self.branches = nn.ModuleDict({"pool": nn.AdaptiveAvgPool2d(1), "proj": nn.Linear(4, 4)})
        self.head = nn.Linear(4, 3)
        self.tied = self.head
        self.register_module("missing", None)
        self.temperature = nn.Parameter(torch.tensor([1.5]), requires_grad=False)
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int32))

    def forward(self, x):
        x = self.stem(x) * self.scale[:, None, None] * self.mask[:, None, None]
        x = self.branches["pool"](self.blocks(x)).flatten(1)
        return self.tied(self.branches["proj"](x)) / self.temperature


def pooled(model: nn.Module, pool_size: int = 1 << 16) -> nn.Module:
    """Makes every floating-point parameter and buffer a strided view into one shared random pool,
    so that a large net saves as a small file (PyTorch writes each storage once) while its
    state_dict still holds distinct, non-trivial values."""
    pool = torch.randn(pool_size)
    with torch.no_grad():
        for i, (name, t) in enumerate(model.state_dict(keep_vars=True).items()):
            if not t.is_floating_point():
                continue
            stride = [1] * t.dim()
            for d in range(t.dim() - 2, -1, -1):
                stride[d] = 3 + 2 * d  # overlapping rows: values repeat with a shift, never in place
            extent = sum((s - 1) * st for s, st in zip(t.shape, stride)) + 1
            view = pool.as_strided(t.shape, stride, (97 * i) % (pool_size - extent))
            owner, attr = _owner(model, name)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(view, requires_grad=t.requires_grad)
            else:
                owner._buffers[attr] = view
    return model


def _owner(model: nn.Module, name: str):
    *path, attr = name.split(".")
    owner = model
    for p in path:
        owner = getattr(owner, p)
    return owner, attr


def export_training_checkpoints(out: str) -> None:
    torch.manual_seed(4321)

    def path(name):
        return os.path.join(out, name)

    def expected(name, state_dict):
        torch.save(OrderedDict(state_dict), path(name + ".expected.pth"))

    def sgd_state(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        model.train()
        model(torch.randn(2, 3, 16, 16)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        return opt

    def cifar8():
        return randomize_norm_state(RR.CifarResNet(8, 10, "A"), input_shape=(4, 3, 16, 16))

    args = argparse.Namespace(model="cifar_resnet8", lr=0.1, epochs=90, amp=True, output_dir="runs/a")

    # torchvision references/classification/train.py: model, optimizer, lr_scheduler, epoch, args,
    # model_ema (an AveragedModel: `n_averaged` + `module.` keys) and scaler.
    model = cifar8()
    opt = sgd_state(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99), use_buffers=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update_parameters(model)
    scaler = torch.amp.GradScaler("cpu")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(), "epoch": 41, "args": args,
                "model_ema": ema.state_dict(), "scaler": scaler.state_dict()},
               path("tv_train.pth"))
    expected("tv_train", model.state_dict())
    expected("tv_train_ema", ema.module.state_dict())

    # timm train.py (CheckpointSaver): state_dict, state_dict_ema, optimizer, amp_scaler, args.
    model = cifar8()
    opt = sgd_state(model)
    ema = ModelEmaV2(model)
    torch.save({"epoch": 12, "arch": "cifar_resnet8", "state_dict": model.state_dict(),
                "optimizer": opt.state_dict(), "version": 2, "args": args,
                "amp_scaler": scaler.state_dict(), "state_dict_ema": ema.module.state_dict(),
                "metric": 71.5},
               path("timm_train.pth.tar"))
    expected("timm_train", model.state_dict())

    # Lightning (Trainer.save_checkpoint): `model.`-prefixed state_dict, hyper_parameters holding an
    # argparse.Namespace and a user class, callbacks with tensors, optimizer and AMP scaler states.
    lit = LitClassifier(cifar8())
    opt = sgd_state(lit.model)
    hparams = AttributeDict(lr=0.1, args=args, augmentation=Augmentation(0.2, "rand-m9"))
    torch.save({
        "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
        "state_dict": lit.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min'}": {
                "monitor": "val_loss", "best_model_score": torch.tensor(0.31),
                "best_model_path": "epoch=3.ckpt", "best_k_models": {"epoch=3.ckpt": torch.tensor(0.31)}},
            "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
                "wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.31), "patience": 3},
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10).state_dict()],
        "native_amp_scaling_state": scaler.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }, path("lightning.ckpt"))
    expected("lightning", lit.model.state_dict())

    # torch.save(model): whole-module pickles, bare, inside a dict, and an EMA wrapper object.
    tiny = randomize_norm_state(TinyNet(), input_shape=(4, 3, 8, 8)).eval()
    torch.save(tiny, path("tiny_module.pth"))
    expected("tiny_module", tiny.state_dict())
    torch.save({"model": tiny, "epoch": 2, "optimizer": sgd_state_for(tiny)}, path("tiny_module_in_dict.pth"))
    torch.save(ModelEmaV2(tiny), path("tiny_ema_module.pth"))
    resnet18 = pooled(tvm.resnet18()).eval()
    torch.save(resnet18, path("resnet18_module.pth"))
    expected("resnet18_module", resnet18.state_dict())

    # torch.jit.save(torch.jit.script(model)): the scripted module's state_dict (TorchScript keeps
    # non-persistent buffers in it).
    scripted = torch.jit.script(tiny)
    torch.jit.save(scripted, path("tiny_scripted.pt"))
    expected("tiny_scripted", scripted.state_dict())
    scripted = torch.jit.script(resnet18)
    torch.jit.save(scripted, path("resnet18_scripted.pt"))
    expected("resnet18_scripted", scripted.state_dict())


def sgd_state_for(model: nn.Module) -> dict:
    return torch.optim.SGD(model.parameters(), lr=0.01).state_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="writes the checkpoint fixtures only")
    parser.add_argument("--out", default="target/python_ref")
    parser.add_argument("--training-only", action="store_true",
                        help="only the training-script, whole-model and TorchScript files")
    a = parser.parse_args()
    if a.training_only:
        os.makedirs(os.path.join(a.out, "checkpoints"), exist_ok=True)
        export_training_checkpoints(os.path.join(a.out, "checkpoints"))
    else:
        export_checkpoints(a.out)
