"""Cost of each defense on the digits default: one target fit, timed (CPU by default).

    python benchmarks/defense_costs.py [--defenses ce,label_smoothing,...] [--seed 0]
        [--device cpu] [--threads N] [--repeat R]
Digits default (src/crl/config.py): 400-sample stratified subset -> 100 members, mlp,
60 epochs, batch 32, lr 0.05. Prints a Markdown table: seconds (and relative to ce), how many
samples the released model trained on, train accuracy on all 100 members, test accuracy on the
100 non-members, and each defense's report. No attack is run: this measures cost, not privacy.
Seconds are the fastest of --repeat runs, after one untimed warm-up fit.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import crl.defenses  # noqa: F401  (registers defenses)
from crl.config import DATASET_DEFAULTS
from crl.data.datasets import load_dataset
from crl.data.splits import make_pool_split
from crl.defenses.base import build_defense
from crl.engine.fit import Recipe, evaluate, fit
from crl.models import create_model

DEFAULT = "ce,label_smoothing,confidence_penalty,early_stopping,advreg,dmp,dpsgd"


def _short(report: dict) -> str:
    keep = []
    for k, v in report.items():
        if k in ("sampling", "inference_model", "accountant"):
            continue
        keep.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(keep)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--defenses", default=DEFAULT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeat", type=int, default=1, help="time each fit R times, keep the fastest")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d = DATASET_DEFAULTS["digits"]
    data = load_dataset("digits")
    split = make_pool_split(data.y.numpy(), seed=a.seed, subset=d["subset"])
    recipe = Recipe(epochs=d["epochs"], batch_size=d["batch_size"], lr=d["lr"], seed=a.seed,
                    device=a.device)
    print(f"# digits default: {len(split.target_members)} members, {d['model']}, "
          f"{d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| defense | seconds | x ce | trained on | train acc | test acc | report |")
    print("|---|---|---|---|---|---|---|")

    def one(name: str, rec: Recipe):
        torch.manual_seed(a.seed)
        model = create_model(d["model"], data.x.shape[1], data.x.shape[-1], data.num_classes)
        defense = build_defense(name)
        t0 = time.perf_counter()
        res = fit(model, data, split.target_members, rec, defense, progress=False)
        return time.perf_counter() - t0, res, defense

    one("ce", Recipe(epochs=2, batch_size=d["batch_size"], lr=d["lr"], device=a.device))  # warm-up
    base = None
    for name in [n.strip() for n in a.defenses.split(",") if n.strip()]:
        runs = [one(name, recipe) for _ in range(max(1, a.repeat))]
        secs = min(r[0] for r in runs)
        _, res, defense = runs[0]
        base = secs if name == "ce" else base
        _, train_acc = evaluate(res.model, data, split.target_members)
        _, test_acc = evaluate(res.model, data, split.target_nonmembers)
        rel = f"{secs / base:.1f}" if base else "-"
        print(f"| {name} | {secs:.2f} | {rel} | {len(res.train_idx)} | {train_acc:.3f} | "
              f"{test_acc:.3f} | {_short(defense.report())} |", flush=True)


if __name__ == "__main__":
    main()
