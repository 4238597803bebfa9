"""PyTorch DistributedDataParallel reference for `residual train` under torchrun.

Writes OUT/ddp/: a tiny IDX data set (`data/`), the model config (`model.json`), the training
options (`train.json`), the initial weights (`init.safetensors`), and what 2 Gloo processes of
`torch.nn.parallel.DistributedDataParallel` (launched by torchrun on 127.0.0.1) end with after
`epochs` epochs of SGD: rank 0's state_dict (`final.safetensors`) and each step's loss per rank
(`losses.json`). Each rank reads the epoch order `residual train` draws (a SplitMix64
Fisher-Yates shuffle seeded by (seed, epoch), src/data/batch.rs) through DistributedSampler's
sharding: padded by repeating its start to a multiple of the world size, every world-th index from
the rank on. No augmentation; normalisation as src/data/batch.rs's Normalizer.

Usage: python ddp_ref.py --out DIR            (prepares, then runs torchrun itself)
       torchrun ... ddp_ref.py --worker DIR   (one rank; torchrun sets RANK and WORLD_SIZE)
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
from resnet_ref import CifarResNet  # noqa: E402

N_TRAIN, N_TEST, SIDE = 51, 8, 12
CONFIG = {"arch": "cifar_resnet", "depth": 8, "in_channels": 1}
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "seed": 3}
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


def idx_bytes(t: torch.Tensor) -> bytes:
    head = bytes([0, 0, 8, t.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in t.shape)
    return head + t.to(torch.uint8).contiguous().numpy().tobytes()


def read_idx(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = f.read()
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    body = data[4 + 4 * len(dims):]
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


def prepare(out: str) -> None:
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
    torch.manual_seed(TRAIN["seed"])
    model = CifarResNet(CONFIG["depth"], in_channels=CONFIG["in_channels"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "init.safetensors"))
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(CONFIG, f)
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump({**TRAIN, "world_size": WORLD, "n_train": N_TRAIN}, f)


def worker(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    images = read_idx(os.path.join(out, "data", "train-images-idx3-ubyte")).unsqueeze(1)
    labels = read_idx(os.path.join(out, "data", "train-labels-idx1-ubyte")).long()
    x = images.double() / 255
    per_channel = x.transpose(0, 1).reshape(images.shape[1], -1)
    mean = per_channel.mean(1)
    std = per_channel.std(1, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    mean_t, std_t = mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)

    model = CifarResNet(CONFIG["depth"], in_channels=CONFIG["in_channels"])
    model.load_state_dict(load_file(os.path.join(out, "init.safetensors")))
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=TRAIN["lr"], momentum=TRAIN["momentum"],
                          weight_decay=TRAIN["weight_decay"])
    losses = []
    b = TRAIN["batch_size"]
    for epoch in range(TRAIN["epochs"]):
        mine = shard(epoch_order(N_TRAIN, TRAIN["seed"], epoch), rank, world)
        for start in range(0, len(mine), b):
            idx = torch.tensor(mine[start:start + b])
            xb = (images.index_select(0, idx).float() / 255 - mean_t) / std_t
            yb = labels.index_select(0, idx)
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, "final.safetensors"))
        with open(os.path.join(out, "losses.json"), "w") as f:
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
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    export(args.out)


def export(root: str) -> str:
    """Writes ROOT/ddp (data, initial weights, and the DDP run's results); returns "ddp"."""
    out = os.path.join(root, "ddp")
    prepare(out)
    for attempt in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Its own session, so that a run that hangs is killed with its ranks, then tried again.
        run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run",
                                f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
                                f"--master_port={port}", os.path.abspath(__file__), "--worker", out],
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
        raise SystemExit("the DDP reference run failed 3 times")
    print(f"wrote the DDP reference to {out}")
    return "ddp"


if __name__ == "__main__":
    main()
