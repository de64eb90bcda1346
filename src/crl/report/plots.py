"""Figures: logit-margin histograms (paper Fig. 6) and ROC curves on log-log axes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crl.audit.outcome import TargetOutcome
from crl.metrics import roc
from crl.utils import atomic_path


def _figure_grid(n: int, width: float = 4.2, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, axes.flat


def _first_seed(outcomes: list[TargetOutcome]) -> list[TargetOutcome]:
    seen, out = set(), []
    for o in outcomes:
        if o.defense not in seen:
            seen.add(o.defense)
            out.append(o)
    return out


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_margins(path: Path, outcomes: list[TargetOutcome]) -> None:
    """Histograms of g_y - max_{i!=y} g_i on members vs non-members, one panel per defense."""
    chosen = _first_seed(outcomes)
    plt, fig, axes = _figure_grid(len(chosen))
    for ax, o in zip(axes, chosen):
        m, member = o.evaluated(o.margins), o.is_member
        lo, hi = np.percentile(m, [0.5, 99.5])
        bins = np.linspace(lo, hi, 40)
        ax.hist(m[member], bins=bins, alpha=0.6, label="members", color="tab:red", density=True)
        ax.hist(m[~member], bins=bins, alpha=0.6, label="non-members", color="tab:blue",
                density=True)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{o.defense} (seed {o.seed}): train {100 * o.train_acc:.1f}%, "
                     f"test {100 * o.test_acc:.1f}%", fontsize=9)
        ax.set_xlabel("logit margin to the decision boundary")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    _save(fig, plt, path)


def plot_rocs(path: Path, outcomes: list[TargetOutcome]) -> None:
    """ROC curves on log-log axes, one panel per defense, one line per attack."""
    chosen = _first_seed(outcomes)
    plt, fig, axes = _figure_grid(len(chosen))
    for ax, o in zip(axes, chosen):
        member = o.is_member
        floor = 1.0 / max(1, int((~member).sum()))
        for name, attack in o.attacks.items():
            fpr, tpr = roc(o.evaluated(attack.scores), member)
            auc = attack.metrics["auc"]
            ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2),
                    label=f"{name} (AUC {auc:.3f})", lw=1.2)
        grid = np.logspace(np.log10(floor / 2), 0, 50)
        ax.plot(grid, grid, "k--", lw=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor / 2, 1)
        ax.set_ylim(floor / 2, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{o.defense} (seed {o.seed})", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    _save(fig, plt, path)
