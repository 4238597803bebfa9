"""Parity cases of timm's and Hugging Face's ResNets, built by timm 1.0 and transformers 5 with
random weights and calibrated BatchNorm statistics, and saved by the libraries' own save paths.

* timm: named constructors (deep stems, average-pool shortcuts, squeeze-and-excitation; large
  nets stored compactly, see export.py), a plain timm ResNet under a torchvision config (the two
  share key names), and two small custom nets kept whole (TorchScript, every gradient). The
  training case also writes a checkpoint through timm's own `CheckpointSaver` (`state_dict`,
  `state_dict_ema`, `optimizer`, `args` as an argparse.Namespace, ...).
* Hugging Face: `ResNetForImageClassification` / `ResNetModel`, basic and bottleneck layers, the
  stride on the first 1x1 (`downsample_in_bottleneck`) or on the 3x3. Each case folder holds the
  model as `save_pretrained` writes it (`hf/`: config.json, model.safetensors) and one also as
  config.json + pytorch_model.bin (`hf_bin/`). Its state_dict, TorchScript parameters and
  gradients keep Hugging Face's key names (`"layout": "huggingface"` in the manifest); the case's
  config is the ModelConfig the folder must map to.

`export_timm_keys` writes every supported timm constructor's state_dict key names and shapes
(built on the meta device, no weights) for the build-and-load checks of the large ones.
"""

import argparse
import copy
import json
import os
import shutil

import timm
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from timm.utils import CheckpointSaver, ModelEmaV3
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

from resnet_cases import IMAGENET_CALIBRATION, image

# The timm constructors of src/models/timm.rs (`TIMM`), for the key-name check.
TIMM_NAMES = [
    "resnet10t", "resnet14t", "resnet18", "resnet18d", "resnet34", "resnet34d", "resnet26",
    "resnet26t", "resnet26d", "resnet50", "resnet50c", "resnet50d", "resnet50s", "resnet50t",
    "resnet101", "resnet101c", "resnet101d", "resnet101s", "resnet152", "resnet152c",
    "resnet152d", "resnet152s", "resnet200", "resnet200d", "wide_resnet50_2", "wide_resnet101_2",
    "resnext50_32x4d", "resnext50d_32x4d", "resnext101_32x4d", "resnext101_32x8d",
    "resnext101_32x16d", "resnext101_32x32d", "resnext101_64x4d", "seresnet18", "seresnet34",
    "seresnet50", "seresnet50t", "seresnet101", "seresnet152", "seresnet152d", "seresnet200d",
    "seresnet269d", "seresnext26d_32x4d", "seresnext26t_32x4d", "seresnext50_32x4d",
    "seresnext101_32x4d", "seresnext101_32x8d", "seresnext101d_32x8d", "seresnext101_64x4d",
]

# The small timm net's training-step case: two torch.optim.SGD steps (the second uses momentum).
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "decay_norm_and_bias": True, "steps": 2}


def timm_named(Case, name, config_name, mode="eval", **kwargs):
    """timm.create_model(config_name, num_classes=10, **kwargs) against
    {"arch": "timm", "name": config_name, "num_classes": 10}."""
    config = {"arch": "timm", "name": config_name, "num_classes": 10}
    if kwargs.get("output_stride") == 8:
        config["replace_stride_with_dilation"] = [False, True, True]
    return Case(
        name=name,
        module="timm.ResNet",
        config=config,
        build=lambda: timm.create_model(config_name, num_classes=10, **kwargs),
        condition=IMAGENET_CALIBRATION,
        inputs=image(2, 3, 64),
        mode=mode,
        compact=True,
    )


def save_timm_checkpoint(model, case_dir):
    """What timm's train.py writes at the end of an epoch: CheckpointSaver.save_checkpoint with
    an EMA copy, the optimizer (after one step: momentum buffers) and the parsed arguments. The
    weights saved are the case's state_dict (the step runs on a copy); the EMA copy's floating
    point entries are those halved, so that a reader's choice between the two shows."""
    trained = copy.deepcopy(model)
    ema = ModelEmaV3(model, decay=0.999)
    with torch.no_grad():
        for t in ema.module.state_dict().values():
            if t.is_floating_point():
                t.mul_(0.5)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    trained(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    args = argparse.Namespace(model="resnet_tiny_se_tiered", num_classes=5, lr=0.1,
                              momentum=0.9, epochs=3, model_ema=True, amp=False)
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema,
                            checkpoint_dir=case_dir, recovery_dir=case_dir, max_history=1)
    saver.save_checkpoint(epoch=2, metric=41.5)


def timm_cases(Case):
    out = [
        timm_named(Case, "timm_resnet50d", "resnet50d"),
        timm_named(Case, "timm_resnet50s", "resnet50s"),
        timm_named(Case, "timm_resnet26t", "resnet26t"),
        timm_named(Case, "timm_resnet10t_train", "resnet10t", mode="train"),
        timm_named(Case, "timm_seresnext50_32x4d", "seresnext50_32x4d"),
        timm_named(Case, "timm_seresnet18_train", "seresnet18", mode="train"),
        timm_named(Case, "timm_resnet14t_output_stride_8", "resnet14t", output_stride=8),
        # A plain timm ResNet has torchvision's keys: the torchvision config loads it.
        Case(
            name="timm_resnet50_as_torchvision",
            module="timm.ResNet",
            config={"arch": "resnet50", "num_classes": 10},
            build=lambda: timm.create_model("resnet50", num_classes=10),
            condition=IMAGENET_CALIBRATION,
            inputs=image(2, 3, 64),
            compact=True,
        ),
        # Small custom nets, kept whole: every option on a bottleneck (grouped) and a basic net.
        Case(
            name="timm_tiny_se_tiered_train",
            module="timm.ResNet",
            config={"arch": "resnet", "block": "bottleneck", "layers": [1, 2, 1, 1],
                    "groups": 2, "width_per_group": 32, "channels": [16, 32, 48, 64],
                    "stem_type": "deep_tiered", "stem_width": 8, "avg_down": True,
                    "attn_layer": "se", "num_classes": 5},
            build=lambda: ResNet(Bottleneck, (1, 2, 1, 1), channels=(16, 32, 48, 64),
                                 cardinality=2, base_width=32, stem_width=8,
                                 stem_type="deep_tiered", avg_down=True,
                                 block_args=dict(attn_layer="se"), num_classes=5),
            condition=(8, 3, 32, 32),
            inputs=image(2, 3, 32),
            mode="train",
            sgd=SGD,
            torch_save=False,
            save=save_timm_checkpoint,
        ),
        Case(
            name="timm_tiny_basic_deep_se",
            module="timm.ResNet",
            config={"arch": "resnet", "block": "basic", "layers": [1, 1, 2, 1],
                    "channels": [8, 16, 24, 32], "stem_type": "deep", "stem_width": 16,
                    "avg_down": True, "attn_layer": "se", "num_classes": 4},
            build=lambda: ResNet(BasicBlock, (1, 1, 2, 1), channels=(8, 16, 24, 32),
                                 stem_width=16, stem_type="deep", avg_down=True,
                                 block_args=dict(attn_layer="se"), num_classes=4),
            condition=(8, 3, 40, 40),
            inputs=lambda: {"input": torch.randn(2, 3, 40, 36)},
            torch_save=False,
        ),
    ]
    return out


class HFLogits(ResNetForImageClassification):
    """The logits alone, so that the export's forward and TorchScript see one tensor."""

    def forward(self, pixel_values):
        return super().forward(pixel_values).logits


class HFPooled(ResNetModel):
    """The pooled features `[B, C]` (`pooler_output` flattened)."""

    def forward(self, pixel_values):
        return super().forward(pixel_values).pooler_output.flatten(1)


def save_hf(bin_copy=False):
    """Writes the case's weights as Hugging Face does: `save_pretrained` of the library's own
    class into `hf/`, and with `bin_copy` also config.json + pytorch_model.bin (torch.save of the
    state_dict; transformers 5 always writes safetensors) into `hf_bin/`."""

    def save(model, case_dir):
        cls = ResNetForImageClassification if isinstance(model, HFLogits) else ResNetModel
        plain = cls(model.config)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(os.path.join(case_dir, "hf"))
        if bin_copy:
            folder = os.path.join(case_dir, "hf_bin")
            os.makedirs(folder, exist_ok=True)
            shutil.copy(os.path.join(case_dir, "hf", "config.json"), folder)
            torch.save(plain.state_dict(), os.path.join(folder, "pytorch_model.bin"))

    return save


def hf_case(Case, name, hf, expected, mode="eval", head=True, bin_copy=False, size=48):
    return Case(
        name=name,
        module="transformers.ResNet",
        config=expected,
        build=lambda: (HFLogits if head else HFPooled)(ResNetConfig(**hf)),
        condition=(8, 3, size, size),
        inputs=image(2, 3, size),
        mode=mode,
        torch_save=False,
        save=save_hf(bin_copy),
        layout="huggingface",
    )


def hf_cases(Case):
    labels = {"id2label": {"0": "tench", "1": "goldfish", "2": "great white shark"},
              "label2id": {"tench": 0, "goldfish": 1, "great white shark": 2}}
    basic = dict(layer_type="basic", embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                 depths=[1, 2, 1, 1], **labels)
    bottleneck = dict(layer_type="bottleneck", embedding_size=16,
                      hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 2, 1], **labels)

    def resnet(block, hf, **extra):
        config = {"arch": "resnet", "block": block, "layers": hf["depths"], "groups": 1,
                  "width_per_group": 64,
                  "channels": [c // (4 if block == "bottleneck" else 1) for c in hf["hidden_sizes"]],
                  "stem_type": "default", "stem_width": hf["embedding_size"], "avg_down": False,
                  "attn_layer": "none",
                  "stride_in_1x1": hf.get("downsample_in_bottleneck", False),
                  "downsample_in_first_stage": hf.get("downsample_in_first_stage", False),
                  "num_classes": 3}
        config.update(extra)
        return config

    v1 = dict(bottleneck, downsample_in_bottleneck=True)
    v15_first = dict(bottleneck, downsample_in_first_stage=True)
    return [
        hf_case(Case, "hf_basic", basic, resnet("basic", basic), bin_copy=True),
        hf_case(Case, "hf_bottleneck_v1_train", v1, resnet("bottleneck", v1), mode="train"),
        hf_case(Case, "hf_bottleneck_first_stage_stride", v15_first,
                resnet("bottleneck", v15_first), size=64),
        hf_case(Case, "hf_model_bottleneck_no_head", bottleneck,
                resnet("bottleneck", bottleneck, include_fc=False), head=False),
    ]


def cases(Case):
    return timm_cases(Case) + hf_cases(Case)


def export_timm_keys(out_dir: str) -> str:
    """`timm_keys.json`: {name: [[key, shape], ...]} of each timm constructor in TIMM_NAMES with
    its default 1000 classes, in state_dict order."""
    keys = {}
    for name in TIMM_NAMES:
        with torch.device("meta"):
            model = timm.create_model(name)
        keys[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    path = os.path.join(out_dir, "timm_keys.json")
    with open(path, "w") as f:
        json.dump({"timm_version": timm.__version__, "models": keys}, f)
    return "timm_keys.json"
