"""Markdown tables from the results.json of one or more finished `crl audit` run directories:
per target (defense, seed), its accuracies and each attack's AUC and TPR at 1% FPR with their
95% intervals, and, where the run had canaries, the one-run epsilon lower bound.

    python benchmarks/runs_table.py runs/a runs/b --attacks loss,mentr,gap,augment,boundary
    python benchmarks/runs_table.py runs/a --epsilon

Every number is read from results.json as `crl audit` wrote it; nothing is recomputed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crl.report.cells import metric_cell


def rows(runs: list[Path]) -> list[dict[str, Any]]:
    """Every target row of every run's results.json, in the order given."""
    out = []
    for run in runs:
        path = run / "results.json"
        if not path.is_file():
            raise SystemExit(f"run = {run}: expected a finished crl audit run (no results.json)")
        out.extend(json.loads(path.read_text()))
    return out


def attack_table(targets: list[dict[str, Any]], attacks: list[str]) -> str:
    """One line per target: accuracies, then AUC and TPR at 1% FPR of each attack."""
    head = ["defense", "seed", "train %", "test %"]
    for a in attacks:
        head += [f"{a} AUC", f"{a} TPR@1%FPR %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in targets:
        cells = [r["defense"], str(r["seed"]), f"{100 * r['train_acc']:.1f}",
                 f"{100 * r['test_acc']:.1f}"]
        for a in attacks:
            m = r["attacks"].get(a, {})
            cells += [metric_cell(m, "auc"), metric_cell(m, "tpr_at_1pct_fpr")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epsilon_table(targets: list[dict[str, Any]]) -> str:
    """One line per target with canaries: the one-run bound, its ceiling and the guesses."""
    head = ["defense", "seed", "test %", "attack", "canaries (in target)",
            "guesses: correct / made", "epsilon lower bound (95%)", "ceiling",
            "accountant epsilon"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in targets:
        bound = (r.get("canaries") or {}).get("epsilon_lower_bound")
        if not bound or not bound.get("one_run"):
            continue
        one = bound["one_run"]
        accountant = bound.get("accountant_epsilon")
        lines.append("| " + " | ".join([
            r["defense"], str(r["seed"]), f"{100 * r['test_acc']:.1f}", bound["attack"],
            f"{one['canaries']} ({one['included']})", f"{one['correct']} / {one['guesses']}",
            f"{one['epsilon_lower_bound']:.2f}", f"{one['ceiling']:.2f}",
            "-" if accountant is None else f"{accountant:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished crl audit run directories")
    p.add_argument("--attacks", default="", help="comma-separated attacks (default: all)")
    p.add_argument("--epsilon", action="store_true", help="the epsilon table instead")
    a = p.parse_args(argv)
    targets = rows(a.runs)
    if a.epsilon:
        print(epsilon_table(targets))
        return
    attacks = [x for x in a.attacks.split(",") if x] or list(targets[0]["attacks"])
    print(attack_table(targets, attacks))


if __name__ == "__main__":
    main()
