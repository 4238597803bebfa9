"""Parity cases of the ResNet family: torchvision's own models for the ImageNet family, and
`resnet_ref.py` for the plain, option-A/C and CIFAR variants."""

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
# Deep nets: forward within 1e-5 (the ResNet issue's bound), gradients 1e-4; CUDA against the CPU
# references with TF32 off.
DEEP = {"forward": 1e-5, "grad": 1e-4, "cuda": 1e-3}
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}


def randomize_norm_state(model: nn.Module) -> nn.Module:
    """Gives every norm layer non-trivial statistics and affine values, so that eval-mode cases
    exercise them (fresh models have mean 0, var 1, weight 1, bias 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
                if isinstance(m, nn.BatchNorm2d):
                    m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand_like(m.weight) + 0.5)
                m.bias.copy_(torch.randn_like(m.bias) * 0.1)
    return model


def image(batch, channels, size):
    return lambda: {"input": torch.randn(batch, channels, size, size)}


def cases(Case):
    out = []
    for name in TORCHVISION:
        out.append(Case(
            name=f"tv_{name}_224_eval",
            module="torchvision.ResNet",
            config={"arch": name},
            build=lambda name=name: randomize_norm_state(getattr(tvm, name)()),
            inputs=image(1, 3, 224),
            tolerance=DEEP,
            torch_save=name in ("resnet18", "resnet50"),
        ))
    for name, batch in [("resnet18", 4), ("resnet50", 2)]:
        out.append(Case(
            name=f"tv_{name}_train_sgd_step",
            module="torchvision.ResNet",
            config={"arch": name, "num_classes": 10},
            build=lambda name=name: getattr(tvm, name)(num_classes=10),
            inputs=image(batch, 3, 64),
            mode="train",
            tolerance=DEEP,
            sgd=SGD,
        ))
    out += [
        Case(
            name="tv_resnet50_group_norm",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10, "norm": {"group_norm": {"num_groups": 32}}},
            build=lambda: randomize_norm_state(
                tvm.resnet50(num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c))),
            inputs=image(2, 3, 64),
            mode="train",
            tolerance=DEEP,
        ),
        Case(
            name="tv_resnet50_frozen_batch_norm",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10, "norm": "frozen_batch_norm"},
            build=lambda: randomize_norm_state(
                tvm.resnet50(num_classes=10, norm_layer=FrozenBatchNorm2d)),
            inputs=image(2, 3, 64),
            mode="train",
            tolerance=DEEP,
        ),
        Case(
            name="tv_resnet50_dilated",
            module="torchvision.ResNet",
            config={"arch": "resnet50", "num_classes": 10,
                    "replace_stride_with_dilation": [False, True, True]},
            build=lambda: randomize_norm_state(
                tvm.resnet50(num_classes=10, replace_stride_with_dilation=[False, True, True])),
            inputs=image(1, 3, 64),
            tolerance=DEEP,
        ),
        Case(
            name="tv_resnext50_32x4d_zero_init_train",
            module="torchvision.ResNet",
            config={"arch": "resnext50_32x4d", "num_classes": 10, "zero_init_residual": True},
            build=lambda: tvm.resnext50_32x4d(num_classes=10, zero_init_residual=True),
            inputs=image(2, 3, 64),
            mode="train",
            tolerance=DEEP,
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
                randomize_norm_state(RR.ResNet(block, layers, 10, shortcut, plain)),
            inputs=image(2, 3, 64),
            tolerance=DEEP,
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
                build=lambda d=depth, s=shortcut, p=plain, c=channels, m=mode: (
                    lambda net: net if m == "train" else randomize_norm_state(net)
                )(RR.CifarResNet(d, 10, s, p, c)),
                inputs=image(2, channels, size),
                mode=mode,
                tolerance=DEEP,
                sgd=SGD if (depth == 20 and variant in ("A", "plain")) else None,
            ))
    return out
