"""Inference (and training) speed and memory, PyTorch vs residual, side by side in one run.

Usage: python python_ref/bench_infer.py [--residual target/release/residual] [--out target/bench]
                                        [--quick] [--rounds N] [--only resnet18,sid]

Run from the repository root (`make bench` does). Each model and batch is timed five ways, the
five alternating in rounds (the order rotated each round), each call timed on its own, the
median of all timed calls reported; every variant is warmed up first and runs with the same
intra-op thread count (`torch.get_num_threads()`; `OMP_NUM_THREADS` for residual, checked):

  eager   PyTorch eager, the model in eval mode, under `torch.inference_mode()`
  script  PyTorch frozen TorchScript: `torch.jit.optimize_for_inference(torch.jit.freeze(
          torch.jit.trace(model.eval(), inputs)))`, under `torch.inference_mode()`
  plain   `residual bench-infer --plain` (the model as built)
  fast    `residual bench-infer` (its inference form)
  jit     `residual bench-infer --jit`: PyTorch's trace (saved, not frozen) loaded from Rust and
          frozen + `optimize_for_inference`d there through the C++ shim (csrc/jit.cpp)

Both sides build the same architecture from the same config with random weights; inputs are
random, of the same shapes. Then, in the same run:

  - the training step (forward, cross-entropy, backward, SGD) against PyTorch eager
    (python_ref/bench_train.py's comparison);
  - process start to first output, and the peak RSS of the process: `residual infer` on one PNG
    with a resnet18 checkpoint against `python -c` doing the same with torchvision (import torch,
    build resnet18, load the weights, preprocess, forward, print the top 5);
  - memory growth: RSS after 100 and after 10,000 inference calls (2,000 with --quick) of a
    cifar_resnet20 at batch 1, residual's fast path and PyTorch eager;
  - the Predictor's scaling over 1, 2, 4 workers where `residual bench-infer --workers` exists.

Prints a table (ratios residual fast / best PyTorch) and writes everything to OUT/inference.json
and the table as Markdown to OUT/inference.md. `--quick` (or QUICK=1) runs fewer calls.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402
import reference as R  # noqa: E402
import resnet_ref as RR  # noqa: E402

CONV_SDS = {"n_layers": 5, "input_size": 512, "num_labels": 2}
# The original SiD's sizes (python_ref/export.py's `sid_classifier_default`: SiDConfig's defaults,
# 18 layers of width 256, two 768-wide text features as a RoBERTa-base encoder gives).
SID = {"num_categories_list": [12, 30, 7, 100, 4], "num_numerical_features": 6, "num_text_features": 2,
       "text_input_size": 768, "num_labels": 2}


def rows():
    """(label, config, batch, image side or None); the config is residual's JSON."""
    return [
        ("resnet18", {"arch": "resnet18"}, 1, 224),
        ("resnet18", {"arch": "resnet18"}, 32, 224),
        ("resnet50", {"arch": "resnet50"}, 1, 224),
        ("resnet50", {"arch": "resnet50"}, 32, 224),
        ("cifar_resnet56", {"arch": "cifar_resnet", "depth": 56, "in_channels": 1}, 1, 28),
        ("cifar_resnet56", {"arch": "cifar_resnet", "depth": 56, "in_channels": 1}, 128, 28),
        ("conv_sds_head 512x768", {"arch": "conv_sds_head", **CONV_SDS, "hidden_size": 768}, 1, None),
        ("conv_sds_head 512x1024", {"arch": "conv_sds_head", **CONV_SDS, "hidden_size": 1024}, 1, None),
        ("sid_classifier", {"arch": "sid_classifier", **SID}, 4, None),
        ("sid_classifier", {"arch": "sid_classifier", **SID}, 256, None),
    ]


def shape_text(config, batch, side):
    arch = config["arch"]
    if arch == "conv_sds_head":
        return f"{batch}x{config['input_size']}x{config['hidden_size']}"
    if arch == "sid_classifier":
        n = len(config["num_categories_list"]), config["num_numerical_features"], config["num_text_features"]
        return f"{batch} rows ({n[0]} cat, {n[1]} num, {n[2]}x{config['text_input_size']} text)"
    return f"{batch}x{config.get('in_channels', 3)}x{side}x{side}"


def torch_model(config, batch, side):
    """PyTorch's twin of residual's model of `config`, in eval mode, and a random input tuple."""
    arch = config["arch"]
    if arch == "cifar_resnet":
        model = RR.CifarResNet(config["depth"], 10, "A", False, config["in_channels"])
        inputs = (torch.randn(batch, config["in_channels"], side, side),)
    elif arch == "conv_sds_head":
        model = R.ConvSDSHead(**{k: v for k, v in config.items() if k != "arch"})
        inputs = (torch.randn(batch, config["input_size"], config["hidden_size"]),)
    elif arch == "sid_classifier":
        cfg = R.SiDConfig(**{k: v for k, v in config.items() if k != "arch"})
        model = R.SiDClassifier(cfg)
        categorical = torch.stack([torch.randint(0, n, (batch,)) for n in cfg.num_categories_list], dim=1)
        inputs = (categorical, torch.randn(batch, cfg.num_numerical_features),
                  torch.randn(batch, cfg.num_text_features, cfg.text_input_size))
    else:
        model = getattr(torchvision.models, arch)()
        inputs = (torch.randn(batch, 3, side, side),)
    return model.eval(), inputs


def frozen_script(model, inputs, save_to):
    """The frozen, optimised trace of `model`; the trace as traced is saved to `save_to` first."""
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs, check_trace=False)
    traced.save(save_to)
    return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def time_calls(fn, calls):
    """Milliseconds of each of `calls` calls of `fn`."""
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - start))
    return out


def run_json(cmd, env):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Residual:
    def __init__(self, binary, out_dir, threads):
        self.binary = binary
        self.out_dir = out_dir
        self.threads = threads
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def config_args(self, label, config, batch, side):
        path = os.path.join(self.out_dir, "configs", label.replace(" ", "_") + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(config, f)
        args = ["--config", path, "--batch-size", str(batch)]
        return args + (["--image-size", str(side)] if side else [])

    def infer(self, args, calls, warmup, plain=False, extra=()):
        cmd = [self.binary, "bench-infer", *args, "--steps", str(calls), "--warmup", str(warmup), "--json",
               *(["--plain"] if plain else []), *extra]
        report = run_json(cmd, self.env)
        # --workers reports each worker's threads (intra_op_threads) instead.
        if "threads" in report and report["threads"] != self.threads:
            sys.exit(f"residual ran with {report['threads']} threads, PyTorch with {self.threads}")
        return report


def bench_row(residual, label, config, batch, side, rounds, calls, warmup):
    torch.manual_seed(0)
    model, inputs = torch_model(config, batch, side)
    args = residual.config_args(label, config, batch, side)
    traced = os.path.join(residual.out_dir, "scripts", f"{label.replace(' ', '_')}_b{batch}.pt")
    os.makedirs(os.path.dirname(traced), exist_ok=True)
    script = frozen_script(model, inputs, traced)
    samples = {"eager": [], "script": [], "plain": [], "fast": [], "jit": []}
    with torch.inference_mode():
        for fn in (lambda: model(*inputs), lambda: script(*inputs)):
            for _ in range(max(warmup, 2)):  # TorchScript's profiling executor optimises on call 2
                fn()
        variants = {
            "eager": lambda: time_calls(lambda: model(*inputs), calls),
            "script": lambda: time_calls(lambda: script(*inputs), calls),
            "plain": lambda: residual.infer(args, calls, warmup, plain=True)["ms_samples"],
            "fast": lambda: residual.infer(args, calls, warmup)["ms_samples"],
            "jit": lambda: residual.infer(args, calls, max(warmup, 2), extra=["--jit", traced])["ms_samples"],
        }
        order = list(variants)
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                samples[name] += variants[name]()
    ms = {k: statistics.median(v) for k, v in samples.items()}
    best = min(("eager", "script"), key=lambda k: ms[k])
    return {"model": label, "batch": batch, "input": shape_text(config, batch, side), "config": config,
            "ms": ms, "best_pytorch": best, "ratio_fast_over_best_pytorch": ms["fast"] / ms[best],
            "ratio_fast_over_plain": ms["fast"] / ms["plain"], "ratio_jit_over_fast": ms["jit"] / ms["fast"],
            "calls_per_variant": len(samples["fast"]),
            "samples_ms": samples}


PYTHON_INFER = r"""
import sys
import torch, torchvision
from torchvision.io import read_image
from torchvision.models import ResNet18_Weights
weights, image = sys.argv[1], sys.argv[2]
model = torchvision.models.resnet18()
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
x = ResNet18_Weights.IMAGENET1K_V1.transforms()(read_image(image)).unsqueeze(0)
with torch.inference_mode():
    p = model(x).softmax(1)[0]
names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
print(image)
for v, i in zip(*p.topk(5)):
    print(f"  {100 * v.item():>6.2f}%  {names[i]} ({i})")
"""


def start_and_rss(cmd, env, scratch):
    """Seconds from spawn to the first line on stdout, the whole run's seconds, and the process's
    peak RSS in kB. The peak comes from GNU time, which forks the command itself: a child forked
    from this (large) Python process would report this process's peak as its own."""
    rss_file = os.path.join(scratch, "peak_rss_kb")
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.readline()
    first = time.perf_counter() - start
    proc.stdout.read()
    err = proc.stderr.read()
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()}")
    with open(rss_file) as f:
        return first, total, int(f.read().split()[-1])


def bench_startup(residual, rounds):
    d = residual.out_dir
    weights, image, config = f"{d}/resnet18.pth", f"{d}/image.png", f"{d}/configs/resnet18_infer.json"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    # A smooth 500x375 picture: decoding and the resize do real work.
    y, x = torch.meshgrid(torch.linspace(0, 1, 375), torch.linspace(0, 1, 500), indexing="ij")
    rgb = torch.stack([x, y, (x * y).sqrt()]) * 255
    torchvision.io.write_png(rgb.to(torch.uint8), image)
    with open(config, "w") as f:
        json.dump({"arch": "resnet18"}, f)
    cmds = {"residual": [residual.binary, "infer", "--config", config, "--weights", weights, "--image", image,
                         "--topk", "5"],
            "python": [sys.executable, "-c", PYTHON_INFER, weights, image]}
    runs = {k: [] for k in cmds}
    for k, cmd in cmds.items():  # warm the page cache
        start_and_rss(cmd, residual.env, d)
    for _ in range(rounds):
        for k, cmd in cmds.items():
            runs[k].append(start_and_rss(cmd, residual.env, d))
    out = {}
    for k, v in runs.items():
        out[k] = {"first_output_s": statistics.median(r[0] for r in v), "total_s": statistics.median(r[1] for r in v),
                  "peak_rss_kb": max(r[2] for r in v)}
    out["ratio_first_output"] = out["residual"]["first_output_s"] / out["python"]["first_output_s"]
    out["ratio_peak_rss"] = out["residual"]["peak_rss_kb"] / out["python"]["peak_rss_kb"]
    out["commands"] = {"residual": " ".join(cmds["residual"]), "python": "python -c <torchvision resnet18 top-5>"}
    return out


PYTHON_GROWTH = r"""
import json, sys
import torch
import resnet_ref as RR
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
marks = json.loads(sys.argv[1])
torch.manual_seed(0)
model = RR.CifarResNet(20, 10, "A", False, 1).eval()
x = torch.randn(1, 1, 28, 28)
rss = {}
with torch.inference_mode():
    for i in range(1, marks[-1] + 1):
        model(x)
        if i in marks:
            rss[i] = rss_kb()
print(json.dumps(rss))
"""


def bench_growth(residual, calls):
    marks = [100, calls]
    config = {"arch": "cifar_resnet", "depth": 20, "in_channels": 1}
    args = residual.config_args("cifar_resnet20_growth", config, 1, 28)
    report = residual.infer(args, calls, 0, extra=["--rss-at", ",".join(map(str, marks))])
    ours = {int(k): v for k, v in report["rss_kb"].items()}
    # PyTorch in a process of its own, as residual: this one holds every model timed so far.
    done = subprocess.run([sys.executable, "-c", PYTHON_GROWTH, json.dumps(marks)], capture_output=True, text=True,
                          env=residual.env, cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        sys.exit(f"the PyTorch memory-growth run failed:\n{done.stderr}")
    theirs = {int(k): v for k, v in json.loads(done.stdout).items()}
    return {"model": "cifar_resnet20", "batch": 1, "calls": marks,
            "residual_rss_kb": ours, "pytorch_rss_kb": theirs,
            "residual_growth_kb": ours[calls] - ours[100], "pytorch_growth_kb": theirs[calls] - theirs[100]}


def bench_workers(residual, quick):
    help_text = subprocess.run([residual.binary, "bench-infer", "--help"], capture_output=True, text=True).stdout
    if "--workers" not in help_text:
        return None
    args = ["--arch", "resnet18", "--image-size", "224", "--batch-size", "1"]
    out = []
    for workers in (1, 2, 4):
        report = residual.infer(args, 8 if quick else 20, 2, extra=["--workers", str(workers)])
        out.append({"workers": workers, "images_per_second": report.get("images_per_second"),
                    "ms_per_batch": report.get("ms_per_batch")})
    return out


def machine():
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(result):
    lines = ["| model | input | PyTorch eager | frozen TorchScript | residual plain | residual fast "
             "| residual --jit | fast / best PyTorch |", "|---|---|---|---|---|---|---|---|"]
    for row in result["inference"]:
        ms = row["ms"]
        cell = {k: f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms" for k, v in ms.items()}
        cell[row["best_pytorch"]] = f"**{cell[row['best_pytorch']]}**"
        lines.append(f"| {row['model']} | {row['input']} | {cell['eager']} | {cell['script']} | {cell['plain']} "
                     f"| {cell['fast']} | {cell['jit']} | {row['ratio_fast_over_best_pytorch']:.2f} |")
    lines.append("")
    t = result["training"]
    lines.append(f"| other | PyTorch | residual | residual / PyTorch |")
    lines.append("|---|---|---|---|")
    lines.append(f"| training step, {t['model']} batch {t['batch']} | {t['pytorch_images_per_second']:.0f} images/s "
                 f"| {t['residual_images_per_second']:.0f} images/s | {t['ratio_residual_over_pytorch']:.2f} |")
    s = result["startup"]
    lines.append(f"| start to first output, resnet18 on one PNG | {s['python']['first_output_s']:.2f} s "
                 f"| {s['residual']['first_output_s']:.2f} s | {s['ratio_first_output']:.2f} |")
    lines.append(f"| peak RSS of that run | {s['python']['peak_rss_kb'] / 1024:.0f} MB "
                 f"| {s['residual']['peak_rss_kb'] / 1024:.0f} MB | {s['ratio_peak_rss']:.2f} |")
    g = result["growth"]
    n = g["calls"][1]
    lines.append(f"| RSS after 100 / {n:,} calls, {g['model']} batch 1 "
                 f"| {g['pytorch_rss_kb'][100] / 1024:.1f} / {g['pytorch_rss_kb'][n] / 1024:.1f} MB "
                 f"| {g['residual_rss_kb'][100] / 1024:.1f} / {g['residual_rss_kb'][n] / 1024:.1f} MB | |")
    lines.append("")
    if result["workers"] is None:
        lines.append("Predictor scaling: skipped (this residual has no `bench-infer --workers`).")
    else:
        lines.append("| Predictor workers (resnet18, batch 1) | images/s |")
        lines.append("|---|---|")
        for w in result["workers"]:
            ips = w["images_per_second"]
            lines.append(f"| {w['workers']} | {ips:.1f} |" if ips is not None else f"| {w['workers']} | ? |")
    m = result["machine"]
    lines.append("")
    lines.append(f"{m['cpu']}, {m['cores']} cores, {m['threads']} intra-op threads on both sides, "
                 f"PyTorch {m['torch']}, {m['date']}; median of {result['calls_note']}.")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--residual", default="target/release/residual")
    p.add_argument("--out", default="target/bench")
    p.add_argument("--quick", action="store_true", default=os.environ.get("QUICK", "") not in ("", "0"))
    p.add_argument("--rounds", type=int, help="alternations per model (default 3, 2 with --quick)")
    p.add_argument("--only", help="comma-separated model labels to time (default: all), e.g. resnet18,sid")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    residual = Residual(os.path.abspath(a.residual), os.path.abspath(a.out), threads)
    rounds = a.rounds or (2 if a.quick else 3)
    result = {"machine": machine(), "quick": a.quick, "rounds": rounds, "inference": []}
    for label, config, batch, side in rows():
        if a.only and not any(label.startswith(o) for o in a.only.split(",")):
            continue
        # Calls per variant and round: fewer for the big batches (a resnet50 at 32 is seconds).
        big = batch >= 32 or config["arch"] == "conv_sds_head"
        calls = (1 if a.quick else 2) if big else (5 if a.quick else 10)
        row = bench_row(residual, label, config, batch, side, rounds, calls, 1 if big else 3)
        ms = row["ms"]
        print(f"{label:<24} {row['input']:<42} eager {ms['eager']:8.2f}  script {ms['script']:8.2f}  "
              f"plain {ms['plain']:8.2f}  fast {ms['fast']:8.2f}  jit {ms['jit']:8.2f} ms   fast/best {row['ratio_fast_over_best_pytorch']:.2f}",
              file=sys.stderr)
        result["inference"].append(row)
    result["calls_note"] = (f"{rounds} alternating rounds of {2 if not a.quick else 1} (batch >= 32, ConvSDS) "
                            f"or {10 if not a.quick else 5} calls per variant, after warm-up")
    print("training step ...", file=sys.stderr)
    result["training"] = bench_train.compare(steps=10 if a.quick else 20, warmup=3, rounds=rounds,
                                             residual=residual.binary)
    print("start to first output ...", file=sys.stderr)
    result["startup"] = bench_startup(residual, rounds)
    print("memory growth ...", file=sys.stderr)
    result["growth"] = bench_growth(residual, 2000 if a.quick else 10000)
    result["workers"] = bench_workers(residual, a.quick)
    text = table(result)
    with open(os.path.join(a.out, "inference.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(a.out, "inference.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwrote {a.out}/inference.json and {a.out}/inference.md", file=sys.stderr)


if __name__ == "__main__":
    main()
