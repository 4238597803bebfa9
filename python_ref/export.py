"""Writes the parity references that the Rust tests and `residual parity` compare against.

Usage: python python_ref/export.py [--out target/python_ref] [--only PATTERN ... [--merge]]

`--only` exports the cases whose names match a pattern (`shape_*`); with `--merge` their entries
replace or join those of the existing OUT/manifest.json, whose other cases and fixtures stay.

For every case, into OUT/<case>/:
  module.pt               the module as TorchScript (torch.jit.script; trace only where scripting fails)
  state_dict.safetensors  its state_dict (parameters and buffers, PyTorch's key names)
  state_dict.pth          the same state_dict as written by torch.save (small cases)
  inputs.safetensors      the forward inputs, by name
  outputs.safetensors     the eager outputs (`output`, plus `loss` and any named extras)
  loss.safetensors        what the scalar loss needs besides the outputs (cotangent, target positions)
  grads.safetensors       d loss / d input (`input.<name>`) and / d parameter (`param.<key>`)
  after_step.safetensors  training-step cases: the state_dict after `steps` torch.optim.SGD steps
Cases whose models have more than COMPACT_PARAMS parameters are stored compactly, to keep the
references small: their weights of two or more dimensions are not stored but regenerated on both
sides (`hashed_weights`, recorded under `seeded_weights` in the manifest with a checksum), there is
no module.pt (TorchScript is proven on the other cases), and the gradients of those weights are
stored by their first GRAD_ROWS rows (`param_rows.<key>`; 1-D parameters and input gradients whole).

And OUT/manifest.json listing the cases with their config, mode, shapes, dtypes, tolerances and the
magnitudes of what they compare. The manifest is written last, atomically: a partial export never
looks complete.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from fnmatch import fnmatch
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import reference as R
import resnet_cases
import shape_cases
from checkpoints import export_checkpoints
from ddp_ref import export as export_ddp
from preprocess import export_preprocess, missing_libraries
from probe_cases import export_probe

try:
    import timm_hf_cases
except ImportError as missing:  # a bare PyTorch (the GPU bundle's host) lacks timm / transformers
    timm_hf_cases = None
    TIMM_HF_MISSING = f"{type(missing).__name__}: {missing}"

# Relative fp32 tolerances, max|Δ| / max|reference| per tensor, by the device the Rust side runs on
# (CUDA runs compare to these CPU references, TF32 off). The CPU runs the very kernels PyTorch ran,
# so it is held to a few ulps; see the README's parity section for the CUDA figures.
TOLERANCE = {
    "cpu": {"forward": 1e-6, "grad": 1e-6, "step": 1e-6},
    "cuda": {"forward": 1e-5, "grad": 1e-4, "step": 1e-4},
}


# Above this many parameters a case is stored compactly (see the module docstring).
COMPACT_PARAMS = 5_000_000
GRAD_ROWS = 2


def hashed_uniform(n: int, seed: int) -> torch.Tensor:
    """n float32 values in [-sqrt(3), sqrt(3)) (mean 0, variance 1): a hash of (index, seed) made of
    float64 libtorch element-wise ops that src/parity.rs (`hashed_uniform`) repeats op for op, so
    both sides hold the same numbers without storing them."""
    idx = torch.arange(n, dtype=torch.float64)
    x = torch.sin(idx * 12.9898 + float(seed) * 78.233) * 43758.5453
    u = x - torch.floor(x)
    return ((u - 0.5) * math.sqrt(12.0)).to(torch.float32)


def hashed_weights(model: torch.nn.Module, seed: int) -> Dict[str, Dict]:
    """Replaces every floating-point state_dict entry of two or more dimensions by
    `hashed_uniform(numel, seed + i) * std`, std the entry's own (its init's scale, rounded to
    float32); returns the recipe with a float64 checksum of each."""
    recipe = {}
    with torch.no_grad():
        for i, (key, t) in enumerate(model.state_dict().items()):
            if not (t.is_floating_point() and t.dim() >= 2):
                continue
            std = float(torch.tensor(float(t.double().std()), dtype=torch.float32))
            value = hashed_uniform(t.numel(), seed + i).reshape(t.shape) * std
            t.copy_(value)
            recipe[key] = {"seed": seed + i, "std": std, "sum": float(value.double().sum())}
    return recipe


@dataclass
class Case:
    name: str
    module: str
    config: Dict
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], Dict[str, torch.Tensor]]
    mode: str = "eval"
    loss: str = "weighted_sum"
    loss_inputs: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]] = None
    tolerance: Dict[str, Dict[str, float]] = field(default_factory=lambda: TOLERANCE)
    # `loss == "cross_entropy"`: F.cross_entropy(output, labels, label_smoothing=...) on random
    # labels in [0, output.shape[1]).
    label_smoothing: Optional[float] = None
    # torch.optim.SGD steps after the backward (lr, momentum, weight_decay, decay_norm_and_bias,
    # steps); the state_dict after them is exported. `decay_norm_and_bias: False` puts 1-D tensors
    # and biases in a group with weight_decay 0, as `residual train --no-decay-norm-bias` does.
    sgd: Optional[Dict] = None
    # Whether to also write the state_dict with torch.save (never for compact cases).
    torch_save: bool = True
    # Input shape on which BatchNorm statistics are calibrated after the weights are final
    # (resnet_cases.randomize_norm_state); None leaves the norm layers as built.
    condition: Optional[Tuple[int, ...]] = None
    # Stored compactly (see the module docstring); None: when the model exceeds COMPACT_PARAMS.
    compact: Optional[bool] = None
    # Also saves the model (with the state_dict's values) into the case folder, as a library's
    # own save path writes it: save(model, case_dir).
    save: Optional[Callable[[torch.nn.Module, str], None]] = None
    # Key names of the state_dict, TorchScript parameters and gradients: "pytorch" (the Rust
    # model's) or "huggingface" (mapped by src/models/huggingface.rs).
    layout: str = "pytorch"


def conv_sds_head_case(name, n_layers, input_size, hidden_size, num_labels, batch, mode="eval"):
    cfg = dict(n_layers=n_layers, input_size=input_size, hidden_size=hidden_size, num_labels=num_labels)
    return Case(
        name=name,
        module="ConvSDSHead",
        config={"arch": "conv_sds_head", **cfg},
        build=lambda: R.ConvSDSHead(**cfg),
        inputs=lambda: {"input": torch.randn(batch, input_size, hidden_size)},
        mode=mode,
    )


def qa_positions(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    batch, length, _ = inputs["input"].shape
    start = torch.randint(0, length, (batch,))
    end = torch.randint(0, length, (batch,))
    # One start beyond the sequence (ignored by the loss) and one negative end (clamped to 0).
    start[0] = length + 7
    end[-1] = -3
    return {"start_positions": start, "end_positions": end}


def sid_config(**overrides) -> R.SiDConfig:
    base = dict(
        num_categories_list=[3, 7, 5],
        num_numerical_features=4,
        num_text_features=2,
        text_input_size=24,
        embedding_size=16,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_transform_blocks=2,
        num_attention_blocks=1,
        num_labels=5,
    )
    base.update(overrides)
    return R.SiDConfig(**base)


def sid_inputs(config: R.SiDConfig, batch: int) -> Callable[[], Dict[str, torch.Tensor]]:
    def make():
        categorical = torch.stack(
            [torch.randint(0, n, (batch,)) for n in config.num_categories_list], dim=1
        )
        return {
            "categorical": categorical,
            "numerical": torch.randn(batch, config.num_numerical_features),
            "text": torch.randn(batch, config.num_text_features, config.text_input_size),
        }

    return make


def sid_case(name, config: R.SiDConfig, batch: int, mode="eval"):
    return Case(
        name=name,
        module="SiDClassifier",
        config={"arch": "sid_classifier", **asdict(config)},
        build=lambda: R.SiDClassifier(config),
        inputs=sid_inputs(config, batch),
        mode=mode,
    )


def cases() -> List[Case]:
    block_cfg = sid_config(hidden_size=96, intermediate_size=160)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_dropout_prob=0.0, drop_path_prob=0.0)
    default_sid = R.SiDConfig(
        num_categories_list=[12, 30, 7, 100, 4],
        num_numerical_features=6,
        num_text_features=2,
        text_input_size=768,
        num_labels=2,
    )
    return [
        Case(
            name="conv_sds_layer_small",
            module="ConvSDSLayer",
            config={"arch": "conv_sds_layer", "input_size": 64, "hidden_dim": 96},
            build=lambda: R.ConvSDSLayer(64, 96),
            inputs=lambda: {"input": torch.randn(3, 64, 96)},
        ),
        conv_sds_head_case("conv_sds_head_small_eval", 3, 64, 96, 2, batch=3),
        conv_sds_head_case("conv_sds_head_small_train", 3, 64, 96, 2, batch=3, mode="train"),
        conv_sds_head_case("conv_sds_head_odd", 2, 17, 33, 3, batch=5),
        conv_sds_head_case("conv_sds_head_default", 5, 512, 768, 2, batch=1),
        conv_sds_head_case("conv_sds_head_roberta_large", 5, 512, 1024, 2, batch=1),
        Case(
            name="conv_sds_head_qa_span_loss",
            module="ConvSDSHead",
            config={"arch": "conv_sds_head", "n_layers": 3, "input_size": 64, "hidden_size": 96,
                    "num_labels": 2},
            build=lambda: R.ConvSDSHead(3, 64, 96, 2),
            inputs=lambda: {"input": torch.randn(4, 64, 96)},
            loss="qa_span",
            loss_inputs=qa_positions,
        ),
        Case(
            name="sid_residual_block",
            module="SiDResidualBlock",
            config={"arch": "sid_residual_block", "hidden_size": 96, "intermediate_size": 160,
                    "hidden_dropout_prob": 0.5},
            build=lambda: R.SiDResidualBlock(block_cfg),
            inputs=lambda: {"input": torch.randn(3, 96)},
        ),
        sid_case("sid_classifier_small_eval", sid_config(), batch=3),
        sid_case("sid_classifier_small_train_nodrop", sid_config(**no_dropout), batch=3, mode="train"),
        sid_case("sid_classifier_default", default_sid, batch=4),
    ] + resnet_cases.cases(Case) + shape_cases.cases(Case) + (
        timm_hf_cases.cases(Case) if timm_hf_cases else []
    )


def sgd_param_groups(model: torch.nn.Module, decay_norm_and_bias: bool) -> List[Dict]:
    if decay_norm_and_bias:
        return [{"params": list(model.parameters())}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def magnitude(tensors) -> float:
    """max |x| over floating-point tensors."""
    return max((float(t.detach().abs().max()) for t in tensors
                if t.is_floating_point() and t.numel() > 0), default=0.0)


def to_script(module: torch.nn.Module, inputs: List[torch.Tensor]):
    try:
        return torch.jit.script(module), "script"
    except Exception as err:  # noqa: BLE001 - fall back to trace only where scripting is impossible
        print(f"  torch.jit.script failed ({type(err).__name__}); tracing instead")
        return torch.jit.trace(module, tuple(inputs)), "trace"


def spec(tensors: Dict[str, torch.Tensor]) -> List[Dict]:
    return [
        {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        for k, v in tensors.items()
    ]


def export_case(case: Case, out_dir: str) -> Dict:
    seed = zlib.crc32(case.name.encode())
    torch.manual_seed(seed)
    model = case.build()
    n_params = sum(p.numel() for p in model.parameters())
    compact = n_params > COMPACT_PARAMS if case.compact is None else case.compact
    seeded = hashed_weights(model, seed % 100_000) if compact else {}
    if case.condition is not None:
        resnet_cases.randomize_norm_state(model, case.condition)
    model.train(case.mode == "train")
    inputs = case.inputs()
    extra = case.loss_inputs(inputs) if case.loss_inputs else {}

    case_dir = os.path.join(out_dir, case.name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    # Saved now: the scripted module shares its tensors with `model`, and the forward (BatchNorm's
    # running statistics in training mode) and the SGD step below change them.
    if compact:
        script_method = "none"
    else:
        scripted, script_method = to_script(model, list(inputs.values()))
        scripted.save(os.path.join(case_dir, "module.pt"))
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items())
    if case.save is not None:
        case.save(model, case_dir)

    def forward_backward():
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        output = model(*leaves.values())
        outputs = {"output": output}
        if case.loss == "weighted_sum":
            if "cotangent" not in extra:
                extra["cotangent"] = torch.randn_like(output)
            loss = (output * extra["cotangent"]).sum()
        elif case.loss == "qa_span":
            start, end = output.split(1, dim=-1)
            outputs["start_logits"] = start.squeeze(-1)
            outputs["end_logits"] = end.squeeze(-1)
            loss = R.qa_span_loss(output, extra["start_positions"], extra["end_positions"])
        elif case.loss == "cross_entropy":
            if "labels" not in extra:
                extra["labels"] = torch.randint(0, output.shape[1], (output.shape[0],))
            loss = F.cross_entropy(output, extra["labels"], label_smoothing=case.label_smoothing)
        else:
            raise ValueError(f"unknown loss {case.loss}")
        outputs["loss"] = loss
        loss.backward()
        return leaves, outputs

    leaves, outputs = forward_backward()

    grads = {f"input.{k}": v.grad for k, v in leaves.items() if v.grad is not None}
    for key, param in model.named_parameters():
        grads[f"param.{key}"] = param.grad if param.grad is not None else torch.zeros_like(param)
    magnitudes = {
        "output": magnitude(outputs.values()),
        "grad_inputs": magnitude(v for k, v in grads.items() if k.startswith("input.")),
        "grad_params": magnitude(v for k, v in grads.items() if k.startswith("param.")),
    }
    after_step = None
    if case.sgd is not None:
        sgd = case.sgd
        opt = torch.optim.SGD(sgd_param_groups(model, sgd["decay_norm_and_bias"]), lr=sgd["lr"],
                              momentum=sgd["momentum"], weight_decay=sgd["weight_decay"])
        opt.step()
        for _ in range(1, sgd["steps"]):
            opt.zero_grad()
            forward_backward()
            opt.step()
        after_step = model.state_dict()
        magnitudes["after_step"] = magnitude(after_step.values())
    print("  max |x|: " + ", ".join(f"{k} {v:.3g}" for k, v in magnitudes.items()), flush=True)

    def detach(d):
        return {k: v.detach().contiguous() for k, v in d.items()}

    if compact:
        grads = {(f"param_rows.{k[6:]}" if k.startswith("param.") and v.dim() >= 2 else k):
                 (v[:GRAD_ROWS] if k.startswith("param.") and v.dim() >= 2 else v)
                 for k, v in grads.items()}
    save_file(detach({k: v for k, v in state.items() if k not in seeded}),
              os.path.join(case_dir, "state_dict.safetensors"))
    if case.torch_save and not compact:
        torch.save(state, os.path.join(case_dir, "state_dict.pth"))
    if after_step is not None:
        save_file(detach(after_step), os.path.join(case_dir, "after_step.safetensors"))
    save_file(detach(inputs), os.path.join(case_dir, "inputs.safetensors"))
    save_file(detach(outputs), os.path.join(case_dir, "outputs.safetensors"))
    save_file(detach(extra), os.path.join(case_dir, "loss.safetensors"))
    save_file(detach(grads), os.path.join(case_dir, "grads.safetensors"))

    return {
        "name": case.name,
        "module": case.module,
        "config": case.config,
        "mode": case.mode,
        "loss": case.loss,
        "seed": seed,
        "torchscript": script_method,
        "inputs": spec(inputs),
        "outputs": spec(detach(outputs)),
        "parameters": spec(detach(dict(model.named_parameters()))),
        "buffers": spec(dict(model.named_buffers())),
        "dtype": "float32",
        "tolerance": case.tolerance,
        "label_smoothing": case.label_smoothing,
        "sgd": case.sgd,
        "magnitude": magnitudes,
        "parameter_count": n_params,
        "seeded_weights": seeded,
        "layout": case.layout,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="target/python_ref")
    parser.add_argument("--only", nargs="*", help="export only the cases matching these patterns")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: keep the other cases and fixtures of OUT/manifest.json")
    args = parser.parse_args()
    if args.merge and not args.only:
        parser.error("--merge needs --only")

    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    entries = []
    for case in cases():
        if args.only and not any(fnmatch(case.name, p) for p in args.only):
            continue
        print(f"exporting {case.name}", flush=True)
        entries.append(export_case(case, args.out))

    manifest = {
        "torch_version": torch.__version__,
        "generated_by": "python_ref/export.py",
        "cases": entries,
    }
    if timm_hf_cases is None:
        print(f"no timm / transformers cases: {TIMM_HF_MISSING}", flush=True)
        manifest["missing"] = {"timm_hf_cases": TIMM_HF_MISSING}
    else:
        manifest["timm_keys"] = timm_hf_cases.export_timm_keys(args.out)
    if not args.only:
        print("exporting checkpoint fixtures", flush=True)
        manifest["fixtures"] = export_checkpoints(args.out)
        print("exporting gradient-probe references", flush=True)
        manifest["fixtures"].update(export_probe(args.out))
        missing = missing_libraries()
        if missing:
            # A bare PyTorch host (the GPU bundle's) lacks them; the pins have them.
            print(f"skipping the preprocessing references: {', '.join(missing)} not installed", flush=True)
        else:
            print("exporting preprocessing references", flush=True)
            manifest["fixtures"].update(export_preprocess(args.out))
        print("exporting the DistributedDataParallel reference (2 Gloo processes)", flush=True)
        manifest["fixtures"]["ddp"] = export_ddp(args.out)
    elif args.merge:
        with open(os.path.join(args.out, "manifest.json")) as f:
            previous = json.load(f)
        exported = {e["name"] for e in entries}
        manifest["cases"] = [e for e in previous["cases"] if e["name"] not in exported] + entries
        if "fixtures" in previous:
            manifest["fixtures"] = previous["fixtures"]
    fd, tmp = tempfile.mkstemp(dir=args.out, prefix=".manifest-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "manifest.json"))
    print(f"wrote {len(entries)} cases to {args.out}/manifest.json in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
