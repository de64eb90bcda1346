"""Did a model's training have a late excursion? (issue 20's check of the `cnn` recipe)

Reads the per-epoch `metrics.jsonl` that every trained model writes (`models/<defense>/seed<N>/`
of a run directory) and, for each file, looks at every epoch after `--after` (default 10): an
excursion is an epoch whose train accuracy is more than `--drop` (default 0.05, i.e. 5 points)
below the best train accuracy of any epoch up to it. Prints one line per file: the epochs read,
the last epoch's train and test accuracy, the largest drop below the best so far after
`--after` (and its epoch), and the excursion epochs, if any. Exit status 1 when any file has an
excursion, 2 on unreadable input.

    python benchmarks/excursions.py runs/recipe/s*/models/ce/seed*/metrics.jsonl
    python benchmarks/excursions.py runs/recipe/s0 runs/recipe/s1   # every model of the runs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_epochs(path: Path) -> list[dict]:
    """The rows of one metrics.jsonl, in epoch order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["epoch"])


def excursions(rows: list[dict], after: int, drop: float) -> tuple[float, int | None, list[int]]:
    """(largest drop below the best-so-far train accuracy after epoch `after`, its epoch, the
    epochs whose drop exceeds `drop`)."""
    best, worst, worst_epoch, bad = float("-inf"), 0.0, None, []
    for r in rows:
        best = max(best, r["train_acc"])
        if r["epoch"] <= after:
            continue
        gap = best - r["train_acc"]
        if gap > worst:
            worst, worst_epoch = gap, r["epoch"]
        if gap > drop + 1e-9:    # accuracies are ratios of counts: 0.99 - 0.94 is not > 0.05
            bad.append(r["epoch"])
    return worst, worst_epoch, bad


def metrics_files(paths: list[str]) -> list[Path]:
    """Each path itself when it is a file, else every models/*/seed*/metrics.jsonl under it."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += [p] if p.is_file() else sorted(p.glob("models/*/seed*/metrics.jsonl"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="metrics.jsonl files or run directories")
    p.add_argument("--after", type=int, default=10, help="check epochs after this one (10)")
    p.add_argument("--drop", type=float, default=0.05,
                   help="largest allowed fall of train accuracy below the best so far (0.05)")
    a = p.parse_args(argv)
    files = metrics_files(a.paths)
    if not files:
        print("excursions: no metrics.jsonl found", file=sys.stderr)
        return 2
    failed = False
    print(f"# excursion: an epoch > {a.after} with train accuracy more than {a.drop:.3f} "
          "below the best so far")
    for path in files:
        try:
            rows = read_epochs(path)
        except (OSError, ValueError, KeyError) as e:
            print(f"excursions: {path}: {e}", file=sys.stderr)
            return 2
        worst, at, bad = excursions(rows, a.after, a.drop)
        last = rows[-1]
        failed |= bool(bad)
        verdict = f"EXCURSION at epochs {','.join(map(str, bad))}" if bad else "no excursion"
        if last["epoch"] <= a.after:
            verdict = f"nothing to check yet (no epoch after {a.after})"
        print(f"{path}: {len(rows)} epochs; last train acc {last['train_acc']:.4f}, test acc "
              f"{last['test_acc']:.4f}; largest drop after epoch {a.after}: {worst:.4f}"
              f"{f' (epoch {at})' if at else ''}; {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
