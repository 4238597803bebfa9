"""Parity cases of the ResNet family: torchvision's own models for the ImageNet family, and
`resnet_ref.py` for the plain, option-A/C and CIFAR variants."""

import copy

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_ref as RR

TORCHVISION = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
BLOCKS = {"resnet18": (RR.BasicBlock, [2, 2, 2, 2]), "resnet34": (RR.BasicBlock, [3, 4, 6, 3]),
          "resnet50": (RR.Bottleneck, [3, 4, 6, 3])}
CIFAR_DEPTHS = [20, 32, 44, 56, 110]
# Training-step cases run `steps` torch.optim.SGD steps (the second one uses the momentum buffer);
# the Rust side runs residual::train::Sgd, the trainer's optimizer, with the same settings.
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "decay_norm_and_bias": True, "steps": 2}
SGD_NO_DECAY_GROUPS = {**SGD, "weight_decay": 5e-4, "decay_norm_and_bias": False}
SGD_NO_MOMENTUM = {**SGD, "momentum": 0.0}
# CIFAR cases that end in SGD steps, with the trainer's loss (cross-entropy, label smoothing as
# `residual train --label-smoothing`).
CIFAR_STEPS = {
    "cifar_resnet20_a": dict(sgd=SGD_NO_DECAY_GROUPS, loss="cross_entropy", label_smoothing=0.1),
    "cifar_plain20": dict(sgd=SGD_NO_MOMENTUM, loss="cross_entropy", label_smoothing=0.0),
    "cifar_resnet56_a": dict(sgd=SGD, loss="cross_entropy", label_smoothing=0.2),
}


def randomize_norm_state(model: nn.Module, input_shape=(8, 3, 64, 64),
                         batches: int = 3) -> nn.Module:
    """Gives every norm layer the kind of state a trained net has: moderate random affine values
    (weight in [0.5, 1.5), bias ~ N(0, 0.1)), then BatchNorm running statistics calibrated on
    `batches` random N(0, 1) batches of `input_shape` in training mode with `momentum=None`
    (cumulative averages). Eval-mode activations then stay O(1) through any depth, as in a trained
    net, instead of growing geometrically with uncalibrated statistics.

    FrozenBatchNorm2d has no training mode: a BatchNorm2d twin of the model is conditioned and its
    state loaded."""
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    if frozen:
        twin = copy.deepcopy(model)
        for name, m in list(twin.named_modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, FrozenBatchNorm2d):
                    setattr(m, child_name, nn.BatchNorm2d(child.weight.numel()))
        randomize_norm_state(twin, input_shape, batches)
        model.load_state_dict(twin.state_dict())
        return model
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand_like(m.weight) + 0.5)
            m.bias.copy_(torch.randn_like(m.bias) * 0.1)
        bns = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
        if bns:
            was_training = model.training
            momenta = [m.momentum for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            for _ in range(batches):
                model(torch.randn(*input_shape))
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
                m.num_batches_tracked.fill_(7)
            model.train(was_training)
    return model


def magnitude(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


# BatchNorm calibration batches of the ImageNet-style cases (statistics of random N(0, 1) images do
# not depend on the image size, so 64x64 stands in for 224x224 at a twelfth of the cost).
IMAGENET_CALIBRATION = (8, 3, 64, 64)


def image(batch, channels, size):
    return lambda: {"input": torch.randn(batch, channels, size, size)}


def cases(Case):
    out = []
    for name in TORCHVISION:
        out.append(Case(
            name=f"tv_{name}_224_eval",
            module="torchvision.ResNet",
            config={"arch": name},
            build=lambda name=name: getattr(tvm, name)(),
            condition=IMAGENET_CALIBRATION,
            inputs=image(1, 3, 224),
        ))
    for name, batch, sgd, smoothing in [("resnet18", 4, SGD, None),
                                        ("resnet50", 2, SGD_NO_DECAY_GROUPS, 0.1)]:
        out.append(Case(
            name=f"tv_{name}_train_sgd_step",
            module="torchvision.ResNet",
            config={"arch": name, "num_classes": 10},
            build=lambda name=name: getattr(tvm, name)(num_classes=10),
            inputs=image(batch, 3, 64),
            mode="train",
            loss="weighted_sum" if smoothing is None else "cross_entropy",
            label_smoothing=smoothing,
            sgd=sgd,
            # One torchvision ResNet kept whole: TorchScript, every gradient, stored weights.
            compact=False if name == "resnet18" else None,
            torch_save=False,
        ))
    out += [
        Case(
            name="tv_resnet50_group_norm",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10, "norm": {"group_norm": {"num_groups": 32}}},
            build=lambda: tvm.resnet50(num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c)),
            condition=IMAGENET_CALIBRATION,
            inputs=image(2, 3, 64),
            mode="train",
        ),
        Case(
            name="tv_resnet50_frozen_batch_norm",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10, "norm": "frozen_batch_norm"},
            build=lambda: tvm.resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d),
            condition=IMAGENET_CALIBRATION,
            inputs=image(2, 3, 64),
            mode="train",
        ),
        Case(
            name="tv_resnet50_dilated",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10,
                    "replace_stride_with_dilation": [False, True, True]},
            build=lambda: tvm.resnet50(num_classes=10,
                                       replace_stride_with_dilation=[False, True, True]),
            condition=IMAGENET_CALIBRATION,
            inputs=image(1, 3, 64),
        ),
        Case(
            name="tv_resnext50_32x4d_zero_init_train",
            module="torchvision.ResNet",
            config={"arch": "resnext50_32x4d", "num_classes": 10, "zero_init_residual": True},
            build=lambda: tvm.resnext50_32x4d(num_classes=10, zero_init_residual=True),
            inputs=image(2, 3, 64),
            mode="train",
        ),
    ]
    for name, variant in [("resnet18", "plain"), ("resnet34", "plain"), ("resnet50", "plain"),
                          ("resnet18", "A"), ("resnet18", "C"), ("resnet50", "A"),
                          ("resnet50", "C")]:
        block, layers = BLOCKS[name]
        plain = variant == "plain"
        shortcut = "B" if plain else variant
        config = {"arch": name, "num_classes": 10}
        config.update({"plain": True} if plain else {"shortcut": shortcut})
        out.append(Case(
            name=f"{name}_{'plain' if plain else 'shortcut_' + variant.lower()}",
            module="ResNetVariant",
            config=config,
            build=lambda block=block, layers=layers, shortcut=shortcut, plain=plain:
                RR.ResNet(block, layers, 10, shortcut, plain),
            condition=IMAGENET_CALIBRATION,
            inputs=image(2, 3, 64),
        ))
    for depth in CIFAR_DEPTHS:
        for variant, mode, channels, size in [("A", "train", 1, 28), ("B", "eval", 3, 32),
                                             ("C", "eval", 3, 32), ("plain", "train", 1, 28)]:
            plain = variant == "plain"
            shortcut = "A" if plain else variant
            config = {"arch": "cifar_resnet", "depth": depth, "num_classes": 10,
                      "in_channels": channels, "plain": plain}
            if not plain:
                config["shortcut"] = shortcut
            name = f"cifar_plain{depth}" if plain else f"cifar_resnet{depth}_{variant.lower()}"
            out.append(Case(
                name=name,
                module="CifarResNet",
                config=config,
                build=lambda d=depth, s=shortcut, p=plain, c=channels: RR.CifarResNet(d, 10, s, p, c),
                condition=None if mode == "train" else (8, channels, size, size),
                inputs=image(2, channels, size),
                mode=mode,
                    **(CIFAR_STEPS.get(name) or {}),
            ))
    return out
