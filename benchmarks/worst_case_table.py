"""The tables of docs/worst-case.md from the runs of benchmarks/worst_case.sh: every defense's
accuracy, the share of the canaries its target trained on that it predicts with their canary
label (from model.pt and canaries.json), and each attack's population vs canary AUC and TPR at
0.1% FPR (pooled leave-one-out, 95% intervals over samples), recomputed from the runs' saved
scores (scores/*.npz).

    python benchmarks/worst_case_table.py runs/worst-case
    python benchmarks/worst_case_table.py runs/cifar-canaries --runs ce-crl,relaxloss \
        --dataset imagefolder:../shared/data/cifar10-jpeg.tar.gz

Without --runs: the digits runs of benchmarks/worst_case.sh, mislabeled then noise canaries;
with it, one table of those runs (one canary set: same seed, --subset and --canaries).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import crl
from crl.audit.outcome import load_outcome
from crl.data.canaries import load_canaries
from crl.data.datasets import load_dataset
from crl.report.worst_case import metric_cell, pooled_side

METRICS = ("auc", "tpr_at_0.1pct_fpr")


def _setting(run: str, defense: str, params: dict) -> str:
    if defense == "crl":
        return "tuned (trial 4)" if "tuned" in run else "default"
    if defense in ("relaxloss", "dpsgd", "label_smoothing"):
        key = {"relaxloss": "alpha", "dpsgd": "noise_multiplier", "label_smoothing": "epsilon"}
        return f"{key[defense]} {params[key[defense]]:g}"
    return "-"


MISLABELED = ("main", "crl-tuned", "relaxloss-0.5", "relaxloss-0.8", "dpsgd")
NOISE = ("noise", "noise-crl-tuned", "noise-relaxloss-0.5", "noise-relaxloss-0.8", "noise-dpsgd")
HEAD = ("| defense | setting | train % | test % | fits canaries % | attack | population AUC | "
        "canary AUC | population TPR@0.1% | canary TPR@0.1% |\n" + "|---" * 10 + "|")


def canary_fit(run_dir: Path, defense: str, base) -> float:
    """Share of the canaries the released target trained on that it predicts with their
    (training) canary label."""
    canaries = load_canaries(run_dir, base)
    folder = run_dir / "models" / defense / "seed0"
    member = np.array([c == "1" for c in
                       json.loads((folder / "canaries.json").read_text())["member"][0]])
    with torch.no_grad():
        pred = crl.load_model(folder / "model.pt")(canaries.images.float() / 255).argmax(1)
    return float((pred.numpy() == canaries.labels)[member].mean())


def rows(root: Path, runs: tuple[str, ...], n_boot: int, base) -> list[str]:
    """One row per (run, defense, attack), in the order of the runs' results; `base` is the
    dataset the runs audited (without canaries)."""
    out = []
    for run in runs:
        for path in sorted((root / run / "scores").glob("*.npz")):
            o = load_outcome(path)
            eps = o.defense_report.get("epsilon")
            head = [o.defense, _setting(run, o.defense, o.params)
                    + (f", epsilon {eps:.0f}" if eps else ""),
                    f"{100 * o.train_acc:.1f}", f"{100 * o.test_acc:.1f}",
                    f"{100 * canary_fit(root / run, o.defense, base):.0f}"]
            for attack in o.attacks:
                pop, can = (pooled_side([o], attack, c, n_boot) for c in (False, True))
                cells = [metric_cell(side, m) for m in METRICS for side in (pop, can)]
                out.append("| " + " | ".join(head + [attack] + cells) + " |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--dataset", default="digits", help="the dataset the runs audited")
    p.add_argument("--runs", help="comma-separated run folders under root (one table)")
    args = p.parse_args()
    base = load_dataset(args.dataset)
    for runs in ((tuple(args.runs.split(",")),) if args.runs else (MISLABELED, NOISE)):
        canaries = json.loads((args.root / runs[0] / "canaries.json").read_text())
        print(f"{canaries['n']} {canaries['kind']} canaries (dataset indices "
              f"{canaries['indices'][0]}..{canaries['indices'][-1]}):\n\n{HEAD}")
        print("\n".join(rows(args.root, runs, args.bootstrap, base)) + "\n")


if __name__ == "__main__":
    main()
