"""References for `residual probe gradients`: PyTorch's gradient norms for tiny CIFAR nets.

Writes into OUT/probe/, for a residual and a plain CIFAR ResNet-14 (option A, 1 input channel,
3 classes) in training mode (batch statistics), the loss `F.cross_entropy(model(x), y)` (mean):
  cifar14_{residual,plain}.safetensors   the state_dict
  cifar14_{residual,plain}_input.safetensors   `x` [6, 1, 8, 8], `y` [6] (int64)
  cifar14_{residual,plain}.json          the loss and the L2 norms of dL/d(output) of the stem
                                         and each block and of dL/d(weight) of every conv and fc,
                                         input side first (the Rust probe's order and names)
and, the same way, for the seed's other residual models in eval mode (no batch norms; SiD's
dropout off), with the loss over every position for ConvSDS
(`F.cross_entropy(logits.flatten(0, -2), y.flatten())`):
  conv_sds3.{safetensors,json}, conv_sds3_input.safetensors   ConvSDSHead(3, 4, 6, 2), `input`
                                         [3, 4, 6], `y` [3, 4]; outputs: the input ("stem") and
                                         each layer `convs.{i}`
  sid3.{safetensors,json}, sid3_input.safetensors   a 3-layer SiDClassifier (hidden 8), inputs
                                         `categorical` [5, 2], `numerical` [5, 2], `text`
                                         [5, 1, 4], `y` [5]; outputs: the embeddings ("stem")
                                         and each residual block, in run order
About 1.4 MB in all (the two added cases about 20 kB). Run alone:
`python python_ref/probe_cases.py --out DIR`.
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import reference as R
import resnet_ref as RR


def probe(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    outputs = []
    names = []

    def keep(name):
        def hook(_module, _inputs, out):
            names.append(name)
            outputs.append(out)
        return hook

    handles = [model.relu.register_forward_hook(keep("stem"))]
    for s in (1, 2, 3):
        for i, block in enumerate(getattr(model, f"layer{s}")):
            handles.append(block.register_forward_hook(keep(f"layer{s}.{i}")))
    loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    # The stem's ReLU module runs once per block too (torchvision reuses `self.relu`); only its
    # first call, in the stem, is the stem's output.
    first = names.index("stem")
    stem_out = outputs[first]
    blocks = [(n, o) for n, o in zip(names, outputs) if n != "stem"]
    weights = [(k, p) for k, p in model.named_parameters() if k.endswith("weight") and p.dim() > 1]
    grads = torch.autograd.grad(loss, [stem_out] + [o for _, o in blocks] + [p for _, p in weights])
    norm = lambda g: float(g.double().norm())
    n_out = 1 + len(blocks)
    return {
        "loss": float(loss.detach()),
        "outputs": [{"name": n, "norm": norm(g)} for n, g in zip(["stem"] + [n for n, _ in blocks], grads[:n_out])],
        "weights": [{"name": k, "norm": norm(g)} for (k, _), g in zip(weights, grads[n_out:])],
    }


def export_probe(out_dir: str) -> dict:
    out = os.path.join(out_dir, "probe")
    os.makedirs(out, exist_ok=True)
    for plain in (False, True):
        torch.manual_seed(1212 + plain)
        model = RR.CifarResNet(14, 3, "A", plain, 1).train()
        with torch.no_grad():
            # Batch-norm affine values away from 1 / 0, so that they matter.
            for k, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.rand_like(p) + 0.5 if k.endswith("weight") else torch.rand_like(p) - 0.5)
        x = torch.randn(6, 1, 8, 8)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        name = f"cifar14_{'plain' if plain else 'residual'}"
        result = probe(model, x, y)
        save_file(state, os.path.join(out, f"{name}.safetensors"))
        save_file({"x": x, "y": y}, os.path.join(out, f"{name}_input.safetensors"))
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
    export_other_models(out)
    return {"probe": "probe", "probe_cases": 4}


def probe_hooked(model, inputs, y, stem_module, units) -> dict:
    """The loss and gradient norms with `stem_module`'s output as the stem (or the first input
    when None) and the outputs of `units` (name, module), hooked, in run order."""
    stem = []
    outputs = []
    handles = []
    if stem_module is not None:
        handles.append(stem_module.register_forward_hook(lambda _m, _i, out: stem.append(out)))
    else:
        inputs[0].requires_grad_(True)
        stem.append(inputs[0])
    for name, unit in units:
        handles.append(unit.register_forward_hook(
            lambda _m, _i, out, name=name: outputs.append((name, out))))
    logits = model(*inputs)
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
    for h in handles:
        h.remove()
    weights = [(k, p) for k, p in model.named_parameters() if p.dim() > 1]
    grads = torch.autograd.grad(loss, stem + [o for _, o in outputs] + [p for _, p in weights])
    norm = lambda g: float(g.double().norm())
    n_out = 1 + len(outputs)
    names = ["stem"] + [n for n, _ in outputs]
    return {
        "loss": float(loss.detach()),
        "outputs": [{"name": n, "norm": norm(g)} for n, g in zip(names, grads[:n_out])],
        "weights": [{"name": k, "norm": norm(g)} for (k, _), g in zip(weights, grads[n_out:])],
    }


def save_case(out: str, name: str, model, inputs: dict, result: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, f"{name}.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in inputs.items()},
              os.path.join(out, f"{name}_input.safetensors"))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)


def export_other_models(out: str) -> None:
    torch.manual_seed(1214)
    head = R.ConvSDSHead(3, 4, 6, 2).eval()
    x = torch.randn(3, 4, 6)
    y = torch.randint(0, 2, (3, 4))
    units = [(f"convs.{i}", layer) for i, layer in enumerate(head.convs)]
    result = probe_hooked(head, [x], y, None, units)
    save_case(out, "conv_sds3", head, {"input": x, "y": y}, result)

    torch.manual_seed(1215)
    config = R.SiDConfig(
        num_categories_list=[3, 5], num_numerical_features=2, num_text_features=1,
        text_input_size=4, embedding_size=4, hidden_size=8, intermediate_size=12,
        num_hidden_layers=3, num_labels=3,
    )
    sid = R.SiDClassifier(config).eval()
    with torch.no_grad():
        # SiD zero-initialises its biases: values away from 0, so that they matter.
        for p in sid.parameters():
            p.add_(torch.rand_like(p) * 0.1)
    inputs = {
        "categorical": torch.stack([torch.randint(0, 3, (5,)), torch.randint(0, 5, (5,))], 1),
        "numerical": torch.randn(5, 2),
        "text": torch.randn(5, 1, 4),
    }
    y = torch.randint(0, 3, (5,))
    units = []
    for i, layer in enumerate(sid.model.layers):
        if hasattr(layer, "attention"):
            units += [(f"model.layers.{i}.attention.{j}", b)
                      for j, b in enumerate(layer.attention[:config.num_attention_blocks])]
        units += [(f"model.layers.{i}.transform.{j}", b) for j, b in enumerate(layer.transform)]
    args = [inputs["categorical"], inputs["numerical"], inputs["text"]]
    result = probe_hooked(sid, args, y, sid.model.embeddings, units)
    save_case(out, "sid3", sid, {**inputs, "y": y}, result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="writes the gradient-probe references only")
    parser.add_argument("--out", default="target/python_ref")
    export_probe(parser.parse_args().out)
