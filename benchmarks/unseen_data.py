"""Does a model learn (and memorise) an image dataset under the default recipe?

Trains one target model the way `crl audit` does with the default (non-digits) recipe, in plain
torch so the number does not depend on the audit pipeline: the stratified pool split of
`crl.data.make_pool_split` (members = a quarter of the data or of `--subset`), per-channel
normalisation with the dataset's mean/std, shuffled batches, SGD with momentum 0.9 and weight
decay 5e-4, the lr multiplied by 0.1 after each of `--milestones` epochs, no augmentation;
the split, the model's init and its batch order come from the seed streams `crl audit` uses
for a seed's target model, so `--seeds 1` trains the model the audit's seed 1 trains.
Prints the command, machine and date, the per-epoch training loss, then one Markdown row per
seed: train (member) accuracy, test (non-member) accuracy, gap, and the loss attack's AUC
(members vs non-members, scored by -cross-entropy).

    python benchmarks/unseen_data.py --dataset imagefolder:digits28.tar.gz --model cnn \
        --epochs 3 --subset 8000 --seeds 1
    python benchmarks/unseen_data.py --dataset imagefolder:../shared/data/cifar10-jpeg.tar.gz \
        --model cnn --epochs 30 --bf16 --channels-last        # the memorisation check
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from crl.config import DATASET_DEFAULTS
from crl.core.errors import CRLError
from crl.core.seeding import seed_for, torch_generator
from crl.core.utils import torch_save_atomic
from crl.data import ImageData, load_dataset, make_pool_split, normalize
from crl.models import create_model
from crl.models.evaluation import predict_logits

RECIPE = DATASET_DEFAULTS["*"]


def machine() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        name = names[0] if names else name
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (argparse reports anything else as a bad --seeds value)."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 0 separated by commas")
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="a crl dataset name or imagefolder:PATH")
    p.add_argument("--model", default=RECIPE["model"])
    p.add_argument("--epochs", type=int, help=f"default {RECIPE['epochs']}")
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--milestones", type=lambda t: [int(m) for m in t.split(",") if m.strip()],
                   help="epochs after which lr *= 0.1 ('' none; default: the recipe's when "
                   "--epochs is unset too, as in crl audit)")
    p.add_argument("--subset", type=int, default=RECIPE["subset"])
    p.add_argument("--seeds", type=seed_list, default=[0],
                   help="comma-separated split and model seeds (default 0)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--save", metavar="DIR", help="also write each trained model's state dict "
                   "to DIR/<model>-seed<N>.pt")
    a = p.parse_args(argv)
    if a.milestones is None:     # crl.config: the default schedule belongs to the default epochs
        a.milestones = RECIPE["milestones"] if a.epochs is None else []
    if a.epochs is None:
        a.epochs = RECIPE["epochs"]
    return a


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: ImageData,
                members: torch.Tensor, gen: torch.Generator, a: argparse.Namespace) -> float:
    """One pass over the members in shuffled batches; returns the mean training loss."""
    model.train()
    perm = members[torch.randperm(members.numel(), generator=gen)]
    total = 0.0
    for start in range(0, perm.numel(), a.batch_size):
        idx = perm[start:start + a.batch_size]
        xb = normalize(data.x[idx], data.mean, data.std)
        if a.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
            loss = F.cross_entropy(model(xb).float(), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * idx.numel()
    return total / perm.numel()


def losses_and_accuracy(model: nn.Module, data: ImageData, idx: np.ndarray
                        ) -> tuple[np.ndarray, float]:
    """Per-sample fp32 cross-entropy and accuracy on data[idx] (eval mode)."""
    logits = predict_logits(model, data, idx)
    y = data.y[torch.as_tensor(idx)]
    loss = F.cross_entropy(logits, y, reduction="none").numpy()
    return loss, float((logits.argmax(1) == y).float().mean())


def run_seed(data: ImageData, seed: int, a: argparse.Namespace) -> dict[str, float]:
    """Train one target model on the seed's members; score it on members and non-members."""
    split = make_pool_split(data.y.numpy(), seed_for(seed, "split"), a.subset)
    model_seed = seed_for(seed, "target")          # the audit's target model seed
    torch.manual_seed(seed_for(model_seed, "init"))
    model = create_model(a.model, data.x.shape[1], data.x.shape[-1], data.num_classes)
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, a.milestones, gamma=0.1)
    gen = torch_generator(model_seed, "shuffle")
    members = torch.as_tensor(split.target_members)
    t0 = time.perf_counter()
    for epoch in range(1, a.epochs + 1):
        loss = train_epoch(model, opt, data, members, gen, a)
        sched.step()
        print(f"  seed {seed} epoch {epoch}: train loss {loss:.4f}", flush=True)
    wall = time.perf_counter() - t0
    if a.save:
        torch_save_atomic(model.state_dict(), Path(a.save) / f"{a.model}-seed{seed}.pt")
    in_loss, train_acc = losses_and_accuracy(model, data, split.target_members)
    out_loss, test_acc = losses_and_accuracy(model, data, split.target_nonmembers)
    scores = -np.concatenate([in_loss, out_loss])
    truth = np.r_[np.ones(in_loss.size), np.zeros(out_loss.size)]
    return {"members": members.numel(), "train": train_acc, "test": test_acc,
            "auc": float(roc_auc_score(truth, scores)), "wall": wall}


def benchmark(a: argparse.Namespace) -> list[tuple[int, dict[str, float]]]:
    """Load the dataset, then train and score one model per seed."""
    t0 = time.perf_counter()
    data = load_dataset(a.dataset)
    print(f"# {data.name}: {len(data)} images {tuple(data.shape)}, {data.num_classes} classes, "
          f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    return [(s, run_seed(data, s, a)) for s in a.seeds]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    print("$ python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(argv or sys.argv[1:])]))
    print(f"# {machine()}, torch {torch.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    t0 = time.perf_counter()
    try:
        rows = benchmark(a)
    except CRLError as e:
        sys.exit(f"error: {e}")
    print("\n| model | seed | members | train acc | test acc | gap | loss AUC | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for s, r in rows:
        print(f"| {a.model} | {s} | {r['members']} | {r['train']:.1%} | {r['test']:.1%} | "
              f"{100 * (r['train'] - r['test']):.1f} pts | {r['auc']:.3f} | {r['wall']:.0f} |")
    print(f"\n# {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
