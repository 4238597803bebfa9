"""Parity over the input shapes PyTorch accepts: every ResNet family on images from 1x1 up, odd and
non-square, batch 1 and more, eval and train mode; the conv head on an unbatched sequence.

PyTorch runs a ResNet on any H, W >= 1 (strides round up), so the port must too and give the same
numbers. Train-mode cases keep at least 4 values per channel at every BatchNorm: PyTorch refuses
one (so does the port, tests/resnet.rs), and with two the normalised values are +-1 whatever the
input, so the gradients are rounding noise that only the very same kernels reproduce. Every case here is small: compact storage (weights
regenerated from a hash on both sides, see export.py), so the whole grid adds about 4 MB.
Export just these into an existing reference folder with
`python python_ref/export.py --out DIR --only 'shape_*' --merge`.
"""

import dataclasses

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck

import reference as R
import resnet_ref as RR

# torchvision's basic-block resnet18: (B, C, H, W), mode
RESNET18_GRID = [
    ((1, 3, 1, 1), "eval"),
    ((4, 3, 3, 5), "train"),
    ((1, 3, 7, 7), "eval"),
]
# torchvision's ResNet(Bottleneck, [1, 1, 2, 2]): half a resnet50's weights, and its second blocks
# see the grown dilation. (B, C, H, W), mode, replace_stride_with_dilation
BOTTLENECK_GRID = [
    ((4, 3, 1, 1), "train", [False, False, False]),
    ((1, 3, 13, 6), "eval", [False, False, False]),
    ((2, 3, 9, 7), "train", [False, True, True]),
    ((1, 3, 2, 2), "eval", [False, False, True]),
]
# depth-8 CIFAR nets: shortcut, (B, C, H, W), mode
CIFAR_GRID = [
    ("A", (1, 3, 1, 1), "eval"),
    ("B", (4, 3, 2, 2), "train"),
    ("A", (1, 1, 7, 7), "eval"),
    ("C", (3, 3, 5, 9), "train"),
]


def size_tag(shape, mode):
    b, _, h, w = shape
    return f"{h}x{w}_b{b}_{mode}"


def one_channel_resnet18():
    """The usual Fashion-MNIST recipe: torchvision's resnet18(num_classes=10) with a 1-channel stem."""
    model = tvm.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


def cases(Case):
    def image(shape):
        return lambda: {"input": torch.randn(*shape)}

    def case(name, module, config, build, shape, mode):
        return Case(
            name=name,
            module=module,
            config=config,
            build=build,
            inputs=image(shape),
            mode=mode,
            # BatchNorm statistics of a trained net for eval; train mode uses the batch's own.
            condition=(8, shape[1], 32, 32) if mode == "eval" else None,
            compact=True,
            torch_save=False,
        )

    out = []
    for shape, mode in RESNET18_GRID:
        out.append(case(
            f"shape_tv_resnet18_{size_tag(shape, mode)}",
            "torchvision.ResNet",
            {"arch": "resnet18", "num_classes": 10},
            lambda: tvm.resnet18(num_classes=10),
            shape,
            mode,
        ))
    for shape, mode, dilation in BOTTLENECK_GRID:
        tag = "".join(str(i + 2) for i, d in enumerate(dilation) if d)
        out.append(case(
            f"shape_tv_bottleneck1122{'_dilated' + tag if tag else ''}_{size_tag(shape, mode)}",
            "torchvision.ResNet",
            {"arch": "resnet", "block": "bottleneck", "layers": [1, 1, 2, 2], "num_classes": 10,
             "replace_stride_with_dilation": dilation},
            lambda dilation=dilation: tvm.ResNet(Bottleneck, [1, 1, 2, 2], num_classes=10,
                                                 replace_stride_with_dilation=dilation),
            shape,
            mode,
        ))
    shape = (4, 1, 28, 28)
    out.append(case(
        f"shape_tv_resnet18_1ch_{size_tag(shape, 'eval')}",
        "torchvision.ResNet",
        {"arch": "resnet18", "num_classes": 10, "in_channels": 1},
        one_channel_resnet18,
        shape,
        "eval",
    ))
    for shortcut, shape, mode in CIFAR_GRID:
        channels = shape[1]
        out.append(case(
            f"shape_cifar8_{shortcut.lower()}_{size_tag(shape, mode)}",
            "CifarResNet",
            {"arch": "cifar_resnet", "depth": 8, "num_classes": 10, "in_channels": channels,
             "shortcut": shortcut},
            lambda s=shortcut, c=channels: RR.CifarResNet(8, 10, s, False, c),
            shape,
            mode,
        ))
    # nn.Conv1d takes an unbatched [L, H]; so does the head.
    out.append(Case(
        name="shape_conv_sds_head_unbatched",
        module="ConvSDSHead",
        config={"arch": "conv_sds_head", "n_layers": 2, "input_size": 17, "hidden_size": 33,
                "num_labels": 3},
        build=lambda: R.ConvSDSHead(2, 17, 33, 3),
        inputs=lambda: {"input": torch.randn(17, 33)},
        compact=True,
        torch_save=False,
    ))
    # SiD: PyTorch broadcasts a single feature column over every feature (categorical + offsets,
    # numerical[:, :, None] * direction, the einsum over text), and nn.Embedding reads any index
    # inside the shared table, even past its own feature's count.
    sid = R.SiDConfig(
        num_categories_list=[3, 7, 5],
        num_numerical_features=4,
        num_text_features=2,
        text_input_size=24,
        embedding_size=16,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_transform_blocks=2,
        num_attention_blocks=1,
        num_labels=5,
    )
    sid_config = {"arch": "sid_classifier", **dataclasses.asdict(sid)}
    out.append(Case(
        name="shape_sid_single_columns_b3",
        module="SiDClassifier",
        config=sid_config,
        build=lambda: R.SiDClassifier(sid),
        inputs=lambda: {
            "categorical": torch.randint(0, 3, (3, 1)),
            "numerical": torch.randn(3, 1),
            "text": torch.randn(3, 1, 24),
        },
        torch_save=False,
    ))
    out.append(Case(
        name="shape_sid_index_past_its_feature_b2",
        module="SiDClassifier",
        config=sid_config,
        build=lambda: R.SiDClassifier(sid),
        inputs=lambda: {
            # 9 in the 3-category feature reads row 9 (the 7-category feature's); -2 in the last
            # reads row 8; both inside the 15-row table, as PyTorch allows.
            "categorical": torch.tensor([[9, 0, -2], [2, 11, 4]]),
            "numerical": torch.randn(2, 4),
            "text": torch.randn(2, 2, 24),
        },
        torch_save=False,
    ))
    return out
