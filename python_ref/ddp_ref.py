"""PyTorch DistributedDataParallel reference for `residual train` under torchrun.

Writes OUT/ddp/: a tiny IDX data set (`data/`), the model config (`model.json`), the training
options (`train.json`), the initial weights (`init.safetensors`), and what 2 Gloo processes of
`torch.nn.parallel.DistributedDataParallel` (launched by torchrun on 127.0.0.1) end with after
`epochs` epochs of SGD: rank 0's state_dict (`final.safetensors`) and each step's loss per rank
(`losses.json`). The model is a CIFAR ResNet (depth 8); OUT/ddp/cifar_resnet20/ holds the same files
(the data aside) for cifar_resnet20 (depth 20), whose initial weights are not stored but drawn
by `seeded_init`, and OUT/ddp/resnet18/ for resnet18's layout at widths (4, 8, 16, 32), one epoch
in batches of 9.
OUT/ddp/image_folder/ trains a depth-8 CIFAR ResNet for 3 classes on a folder of 8x8 PNGs
(`data/train/cK/*.png`, `data/val/`) read by torchvision's `ImageFolder` (`ToTensor`,
`Normalize` with ImageNet's statistics) through `DistributedSampler(shuffle=False)` over the
epoch's order: what `residual train` streams from an image folder under torchrun with an
identity training transform.
Each rank reads the epoch order `residual train` draws (a SplitMix64 Fisher-Yates shuffle
seeded by (seed, epoch), src/data/batch.rs) through DistributedSampler's sharding: padded by
repeating its start to a multiple of the world size, every world-th index from the rank on. No
augmentation; normalisation as src/data/batch.rs's Normalizer.

Usage: python ddp_ref.py --out DIR                        (prepares, then runs torchrun itself)
       torchrun ... ddp_ref.py --worker DIR --case NAME   (one rank; torchrun sets RANK, WORLD_SIZE)
"""

import argparse
import datetime
import json
import math
import os
import signal
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet_ref import BasicBlock, CifarResNet, ResNet, init_like_torchvision  # noqa: E402

N_TRAIN, N_TEST, SIDE = 51, 8, 12
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "seed": 3}
# Each case: its model config (as `residual train` reads it), its sub-folder of OUT/ddp, epochs,
# batch size. resnet18's stage 4 sees 1x1 maps here: batches of 9 (26 indices per rank: 9, 9, 8)
# keep its batch norms off 2 values, whose input gradient is 0 in exact arithmetic and rounding
# noise times 1/std in floats (it differed by 2e-2 between two correct runs).
CASES = {
    "cifar_resnet8": ({"arch": "cifar_resnet", "depth": 8, "in_channels": 1}, "", 2, 8),
    "cifar_resnet20": ({"arch": "cifar_resnet", "depth": 20, "in_channels": 1}, "cifar_resnet20",
                       2, 8),
    # resnet18's blocks and layers; torchvision's constructor fixes the widths, so given in full.
    "resnet18": ({"arch": "resnet", "block": "basic", "layers": [2, 2, 2, 2],
                  "channels": [4, 8, 16, 32], "stem_width": 4, "in_channels": 1,
                  "num_classes": 10}, "resnet18", 1, 9),
    # 16 training images: 2 batches of 4 per rank and epoch.
    "image_folder": ({"arch": "cifar_resnet", "depth": 8, "in_channels": 3, "num_classes": 3},
                     "image_folder", 2, 4),
}
# Cases whose initial weights come from `seeded_init` (the test draws them too) instead of an
# init.safetensors: cifar_resnet20's 1.1 MB of float32 weights would be stored twice otherwise.
SEEDED_INIT = {"cifar_resnet20"}
FOLDER_COUNTS = [6, 5, 5]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
WORLD = 2
MASK = (1 << 64) - 1


class SplitMix:
    """src/data/batch.rs's SplitMix64."""

    def __init__(self, seed: int, stream: int):
        self.s = (seed ^ ((stream * 0x9E3779B97F4A7C15) & MASK)) & MASK
        self.next()

    def next(self) -> int:
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return (self.next() * n) >> 64


def epoch_order(n: int, seed: int, epoch: int):
    rng = SplitMix(seed, epoch)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def shard(order, rank: int, world: int):
    """torch.utils.data.DistributedSampler's indices for `rank`, given the epoch's order."""
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / len(order)))[:total]
    return padded[rank:total:world]


def seeded_init(model, seed: int) -> dict:
    """Initial weights that tests/distributed.rs draws too: the k-th entry with 2 or more
    dimensions (convolutions, `fc.weight`) in sorted key order uniform in ±sqrt(6 / fan_in) from
    SplitMix64(seed, k), biases 0, batch norms at their defaults. Computed in float64 and rounded
    to float32 once, so that both languages get the same bits."""
    state = model.state_dict()
    drawn = [k for k in sorted(state) if state[k].dim() >= 2]
    for stream, key in enumerate(drawn):
        t = state[key]
        bound = math.sqrt(6.0 / (t.numel() // t.shape[0]))
        rng = SplitMix(seed, stream)
        values = [(2.0 * ((rng.next() >> 11) * 2.0 ** -53) - 1.0) * bound for _ in range(t.numel())]
        state[key] = torch.tensor(values, dtype=torch.float64).float().reshape(t.shape)
    for key in state:
        if key.endswith(".bias"):
            state[key] = torch.zeros_like(state[key])
    return state


class NarrowResNet(ResNet):
    """torchvision's ResNet with stage widths `channels` and a stem of `stem_width` (residual's
    `channels` / `stem_width` options)."""

    def __init__(self, layers, channels, stem_width, in_channels, num_classes):
        torch.nn.Module.__init__(self)
        self.inplanes, self.groups, self.base_width = stem_width, 1, 64
        self.shortcut, self.plain, self.norm_layer = "B", False, torch.nn.BatchNorm2d
        self.conv1 = torch.nn.Conv2d(in_channels, stem_width, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(stem_width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, channels[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, channels[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, channels[3], layers[3], stride=2)
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(channels[3], num_classes)
        init_like_torchvision(self)


def build(config):
    if config["arch"] == "cifar_resnet":
        return CifarResNet(config["depth"], num_classes=config.get("num_classes", 10),
                           in_channels=config["in_channels"])
    return NarrowResNet(config["layers"], config["channels"], config["stem_width"],
                        config["in_channels"], config["num_classes"])


def idx_bytes(t: torch.Tensor) -> bytes:
    head = bytes([0, 0, 8, t.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in t.shape)
    return head + t.to(torch.uint8).contiguous().numpy().tobytes()


def read_idx(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    body = data[4 + 4 * len(dims):]
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def prepare_data(out: str) -> None:
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    for prefix, n in [("train", N_TRAIN), ("t10k", N_TEST)]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 90, (n, SIDE, SIDE), generator=g)
        # A bright patch whose place gives the class, so that the steps learn something.
        for i, label in enumerate(labels.tolist()):
            r, c = 1 + (label // 5) * 5, 1 + (label % 5) * 2
            images[i, r:r + 4, c:c + 2] += 150
        for kind, t in [("images-idx3", images), ("labels-idx1", labels)]:
            with open(os.path.join(out, "data", f"{prefix}-{kind}-ubyte"), "wb") as f:
                f.write(idx_bytes(t))


def prepare_folder(out: str) -> None:
    """8x8 RGB PNGs in class folders c0, c1, c2 (FOLDER_COUNTS for train/, 2 each for val/),
    each class with a bright row of its own."""
    from PIL import Image

    g = torch.Generator().manual_seed(4321)
    for split, counts in [("train", FOLDER_COUNTS), ("val", [2] * len(FOLDER_COUNTS))]:
        for c, n in enumerate(counts):
            folder = os.path.join(out, "image_folder", "data", split, f"c{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = torch.randint(0, 120, (8, 8, 3), generator=g)
                pixels[2 * c] += 120
                Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB").save(
                    os.path.join(folder, f"{i}.png"))


def folder_epochs(out: str, rank: int, world: int, epochs: int, b: int):
    """Each epoch's batches of rank `rank` as torchvision reads the image folder."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*IMAGENET)])
    data = datasets.ImageFolder(os.path.join(out, "image_folder", "data", "train"), transform)
    for epoch in range(epochs):
        ordered = torch.utils.data.Subset(data, epoch_order(len(data), TRAIN["seed"], epoch))
        sampler = torch.utils.data.DistributedSampler(ordered, world, rank, shuffle=False)
        yield list(torch.utils.data.DataLoader(ordered, batch_size=b, sampler=sampler))


def prepare(out: str, case: str) -> str:
    """Writes the initial weights and options of `case`; returns its folder."""
    config, sub, epochs, batch = CASES[case]
    folder = os.path.join(out, sub)
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(TRAIN["seed"])
    model = build(config)
    if case not in SEEDED_INIT:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "init.safetensors"))
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "train.json"), "w") as f:
        json.dump({**TRAIN, "epochs": epochs, "batch_size": batch, "world_size": WORLD,
                   "n_train": N_TRAIN}, f)
    return folder


def worker(out: str, case: str) -> None:
    config, sub, epochs, b = CASES[case]
    folder = os.path.join(out, sub)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(config)
    init = seeded_init(model, TRAIN["seed"]) if case in SEEDED_INIT \
        else load_file(os.path.join(folder, "init.safetensors"))
    model.load_state_dict(init)
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=TRAIN["lr"], momentum=TRAIN["momentum"],
                          weight_decay=TRAIN["weight_decay"])
    losses = []

    def idx_epochs():
        images = read_idx(os.path.join(out, "data", "train-images-idx3-ubyte")).unsqueeze(1)
        labels = read_idx(os.path.join(out, "data", "train-labels-idx1-ubyte")).long()
        x = images.double() / 255
        per_channel = x.transpose(0, 1).reshape(images.shape[1], -1)
        mean = per_channel.mean(1)
        std = per_channel.std(1, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))
        mean_t, std_t = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)
        for epoch in range(epochs):
            mine = shard(epoch_order(N_TRAIN, TRAIN["seed"], epoch), rank, world)
            batches = []
            for start in range(0, len(mine), b):
                idx = torch.tensor(mine[start:start + b])
                xb = (images.index_select(0, idx).float() / 255 - mean_t) / std_t
                batches.append((xb, labels.index_select(0, idx)))
            yield batches

    epoch_batches = folder_epochs(out, rank, world, epochs, b) if case == "image_folder" \
        else idx_epochs()
    for batches in epoch_batches:
        for xb, yb in batches:
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "final.safetensors"))
        with open(os.path.join(folder, "losses.json"), "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    # Leave without tearing the group down: a rank that outlived its peer could wait in Gloo's
    # shutdown for ever (seen once); everything is written and synchronised by now.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="reference folder; writes OUT/ddp")
    parser.add_argument("--worker", help="run one rank on this OUT/ddp folder")
    parser.add_argument("--case", choices=sorted(CASES), default="cifar_resnet8")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.case)
        return
    export(args.out)


def export(root: str) -> str:
    """Writes ROOT/ddp (data, initial weights, and the DDP runs' results); returns "ddp"."""
    out = os.path.join(root, "ddp")
    prepare_data(out)
    prepare_folder(out)
    for case in CASES:
        prepare(out, case)
        run_ddp(out, case)
    print(f"wrote the DDP references to {out}")
    return "ddp"


def run_ddp(out: str, case: str) -> None:
    """Runs `case` under torchrun with WORLD Gloo processes, three tries at most."""
    for attempt in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Its own session, so that a run that hangs is killed with its ranks, then tried again.
        run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
                                f"--master_port={port}", os.path.abspath(__file__), "--worker", out,
                                "--case", case],
                               start_new_session=True)
        try:
            if run.wait(timeout=300) == 0:
                break
            print(f"the DDP run failed (exit {run.returncode}), attempt {attempt + 1} of 3")
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            print(f"the DDP run hung for 300 s and was killed, attempt {attempt + 1} of 3")
    else:
        raise SystemExit(f"the DDP reference run of {case} failed 3 times")


if __name__ == "__main__":
    main()
