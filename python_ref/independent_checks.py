"""Checks of the hand-written references (`resnet_ref.py`, `reference.py`) against sources written
by other hands, so that the parity tests do not merely compare the port with its author's own
reading of the originals.

Usage: python python_ref/independent_checks.py [--seed-dir DIR] [--original FILE] [--json]

* torchvision: `resnet_ref.ResNet` with shortcut option B (not plain) is torchvision's ResNet; for
  resnet18/34/50 the state_dict keys and shapes must be the same in the same order, the same seed
  must give the same initial weights, and with torchvision's weights loaded the eval and train
  outputs and every gradient must be identical.
* The ResNet paper (He et al. 2015, Table 6): CIFAR ResNet-20/32/44/56/110 with option A have
  0.27M, 0.46M, 0.66M, 0.85M and 1.7M parameters, at the paper's precision.
* SiD: the original `src/modeling.py` of affjljoo3581/Job-Recommend-Competition @ bb41cdd, vendored
  unmodified in `python_ref/original/` (Apache-2.0) and loaded with only its wrong return
  annotation patched, must have `reference.py`'s config fields, state_dict keys and shapes, the same
  initial weights from the same seed, and identical outputs and gradients (eval, and train mode with
  dropout under the same seed); its SiDResidualBlock must be the one the seed document quotes.

Prints one line per check (or a JSON array with --json) and exits 1 when any fails.
"""

import argparse
import dataclasses
import io
import json
import linecache
import os
import re
import sys
import tokenize
import types

import torch
import torchvision.models as tvm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import reference as R  # noqa: E402
import resnet_ref as RR  # noqa: E402
from resnet_cases import randomize_norm_state  # noqa: E402

ORIGINAL = os.path.join(HERE, "original", "modeling.py")
WRONG_ANNOTATION = "-> tuple[torch.Tensor, torch.Tensor]:"
SEED_DOC = "000_cbbbef3084348ae6.txt"
PAPER_CIFAR_PARAMS = {20: "0.27", 32: "0.46", 44: "0.66", 56: "0.85", 110: "1.7"}

results = []


def check(name: str, ok: bool, detail: str = "") -> None:
    results.append({"check": name, "pass": bool(ok), "detail": detail})


def first_difference(a: dict, b: dict) -> str:
    if list(a) != list(b):
        only = sorted(set(a) ^ set(b))
        return f"keys differ (order or set): {only[:5] or 'order'}"
    for k in a:
        if a[k].shape != b[k].shape:
            return f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            return f"{k}: values differ"
    return ""


def grads_of(model, x, cotangent):
    model.zero_grad(set_to_none=True)
    out = model(*x)
    (out * cotangent).sum().backward()
    return out, {k: p.grad for k, p in model.named_parameters()}


def torchvision_coincides(arch: str, block, layers) -> None:
    torch.manual_seed(1)
    tv = getattr(tvm, arch)(num_classes=10)
    torch.manual_seed(1)
    ours = RR.ResNet(block, layers, 10, "B", False)
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]  # noqa: E731
    same_keys = shapes(tv) == shapes(ours)
    check(f"torchvision/{arch}: state_dict keys and shapes", same_keys,
          "" if same_keys else first_difference(tv.state_dict(), ours.state_dict()))
    diff = first_difference(tv.state_dict(), ours.state_dict())
    check(f"torchvision/{arch}: same seed, same initial weights", not diff, diff)

    randomize_norm_state(tv)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = (torch.randn(2, 3, 64, 64),)
    tv.eval()
    ours.eval()
    with torch.no_grad():
        same = torch.equal(tv(*x), ours(*x))
    check(f"torchvision/{arch}: eval outputs identical", same)
    tv.train()
    ours.train()
    cotangent = torch.randn(2, 10)
    out_tv, g_tv = grads_of(tv, x, cotangent)
    out_ours, g_ours = grads_of(ours, x, cotangent)
    diff = first_difference(g_tv, g_ours)
    check(f"torchvision/{arch}: train outputs and gradients identical",
          torch.equal(out_tv, out_ours) and not diff, diff)
    diff = first_difference(tv.state_dict(), ours.state_dict())
    check(f"torchvision/{arch}: running statistics after a train forward identical", not diff, diff)


def cifar_parameter_counts() -> None:
    for depth, paper in PAPER_CIFAR_PARAMS.items():
        model = RR.CifarResNet(depth, 10, "A", False, 3)
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        decimals = len(paper.split(".")[1])
        ours = f"{count / 1e6:.{decimals}f}"
        check(f"paper/cifar_resnet{depth} (option A): {paper}M parameters", ours == paper,
              f"{count} parameters = {ours}M")


def load_original(path: str) -> types.ModuleType:
    """The vendored original, with `SiDLayer.forward`'s return annotation (a tuple, for a function
    returning one tensor, which TorchScript rejects) patched to `torch.Tensor`; nothing else."""
    with open(path) as f:
        text = f.read()
    if text.count(WRONG_ANNOTATION) != 1:
        raise RuntimeError(f"{path}: expected exactly one `{WRONG_ANNOTATION}`")
    text = text.replace(WRONG_ANNOTATION, "-> torch.Tensor:")
    module = types.ModuleType("sid_original")
    module.__file__ = path
    sys.modules[module.__name__] = module
    # TorchScript reads a module's source with inspect, which needs the patched lines.
    linecache.cache[path] = (len(text), None, text.splitlines(True), path)
    exec(compile(text, path, "exec"), module.__dict__)  # noqa: S102 - a vendored test oracle
    return module


def sid_inputs(config, batch: int):
    categorical = torch.stack(
        [torch.randint(0, n, (batch,)) for n in config.num_categories_list], dim=1)
    return (categorical, torch.randn(batch, config.num_numerical_features),
            torch.randn(batch, config.num_text_features, config.text_input_size))


def sid_matches_original(O: types.ModuleType) -> None:
    fields = lambda cls: [(f.name, f.default) for f in dataclasses.fields(cls)]  # noqa: E731
    same = fields(O.SiDConfig) == fields(R.SiDConfig)
    check("sid/original: SiDConfig fields and defaults", same,
          "" if same else f"{fields(O.SiDConfig)} vs {fields(R.SiDConfig)}")
    small = dict(num_categories_list=[3, 7, 5], num_numerical_features=4, num_text_features=2,
                 text_input_size=24, embedding_size=16, hidden_size=48, intermediate_size=80,
                 num_hidden_layers=3, num_transform_blocks=2, num_attention_blocks=1, num_labels=5)
    default = dict(num_categories_list=[12, 30, 7, 100, 4], num_numerical_features=6,
                   num_text_features=2, text_input_size=768, num_labels=2)
    for tag, kwargs in [("small", small), ("default", default)]:
        torch.manual_seed(7)
        original = O.SiDClassifier(O.SiDConfig(**kwargs))
        torch.manual_seed(7)
        ours = R.SiDClassifier(R.SiDConfig(**kwargs))
        diff = first_difference(original.state_dict(), ours.state_dict())
        check(f"sid/original {tag}: state_dict keys, shapes and initial weights (same seed)",
              not diff, diff)
        ours.load_state_dict(original.state_dict(), strict=True)
        x = sid_inputs(R.SiDConfig(**kwargs), 4)
        original.eval()
        ours.eval()
        with torch.no_grad():
            check(f"sid/original {tag}: eval outputs identical",
                  torch.equal(original(*x), ours(*x)))
        try:
            scripted = torch.jit.script(original)
            with torch.no_grad():
                ok, detail = torch.equal(scripted(*x), ours(*x)), ""
        except Exception as err:  # noqa: BLE001 - reported as the check's failure
            ok, detail = False, f"{type(err).__name__}: {err}"
        check(f"sid/original {tag}: scripts once the annotation is patched, same outputs", ok,
              detail)
        original.train()
        ours.train()
        cotangent = torch.randn(4, kwargs["num_labels"])
        torch.manual_seed(11)
        out_o, g_o = grads_of(original, x, cotangent)
        torch.manual_seed(11)
        out_r, g_r = grads_of(ours, x, cotangent)
        diff = first_difference(g_o, g_r)
        check(f"sid/original {tag}: train mode (dropout, drop-path) outputs and gradients "
              f"identical under the same seed", torch.equal(out_o, out_r) and not diff, diff)


def code_tokens(text: str):
    """Python tokens without comments, docstrings, and layout: what the code says."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.STRING and tok.string.startswith('"""'):
            continue
        out.append(tok.string)
    return out


def seed_block_is_the_original(seed_dir: str, original_path: str) -> None:
    path = os.path.join(seed_dir, SEED_DOC)
    if not os.path.exists(path):
        check("sid/seed: the seed document's SiDResidualBlock is the original's", False,
              f"seed document not found at {path} (pass --seed-dir)")
        return
    with open(path) as f:
        seed = f.read()
    quoted = re.search(r"class SiDResidualBlock\(nn\.Module\):.*?return hidden_states \+ "
                       r"self\.dropout\(output\)", seed, re.S)
    with open(original_path) as f:
        original = f.read()
    block = re.search(r"class SiDResidualBlock\(nn\.Module\):.*?return hidden_states \+ "
                      r"self\.dropout\(output\)", original, re.S)
    if not quoted or not block:
        check("sid/seed: the seed document's SiDResidualBlock is the original's", False,
              "block not found")
        return
    # The seed lost its indentation; compare line by line, stripped, without docstring and comments.
    def lines(text):
        text = re.sub(r'"""[\s\S]*?"""', "", text)
        text = re.sub(r"#.*", "", text)
        return [line.strip() for line in text.splitlines() if line.strip()]
    a, b = lines(quoted.group(0)), lines(block.group(0))
    check("sid/seed: the seed document's SiDResidualBlock is the original's",
          a == b and code_tokens("\n".join(a)) == code_tokens("\n".join(b)),
          "" if a == b else f"seed {a} vs original {b}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-dir", default=os.path.join(HERE, "..", "..", "shared", "seed"))
    parser.add_argument("--original", default=ORIGINAL, help="the vendored original modeling.py")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)

    def guarded(name, f, *fargs):
        try:
            f(*fargs)
        except Exception as err:  # noqa: BLE001 - a check that raises fails, with the reason
            check(f"{name}: raised", False, f"{type(err).__name__}: {err}")

    for arch, block, layers in [("resnet18", RR.BasicBlock, [2, 2, 2, 2]),
                                ("resnet34", RR.BasicBlock, [3, 4, 6, 3]),
                                ("resnet50", RR.Bottleneck, [3, 4, 6, 3])]:
        guarded(f"torchvision/{arch}", torchvision_coincides, arch, block, layers)
    guarded("paper", cifar_parameter_counts)
    guarded("sid/original", lambda: sid_matches_original(load_original(args.original)))
    guarded("sid/seed", seed_block_is_the_original, args.seed_dir, args.original)

    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{'ok  ' if r['pass'] else 'FAIL'} {r['check']}"
                  + (f": {r['detail']}" if r["detail"] else ""))
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
