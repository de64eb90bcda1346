"""Figures: logit-margin histograms (paper Fig. 6) and ROC curves on log-log axes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from crl.audit.canaries import pooled_view
from crl.audit.outcome import TargetOutcome
from crl.metrics import roc
from crl.utils import atomic_path


def _figure_grid(n: int, width: float = 4.2, height: float = 3.4, cols: int = 3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, cols)
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


def _roc_panel(ax, title: str, curves: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
    """One log-log ROC panel; curves = [(label, scores, is_member)]."""
    floor = 1.0 / max(1, max(int((~m).sum()) for _, _, m in curves))
    for label, scores, member in curves:
        fpr, tpr = roc(scores, member)
        ax.plot(np.maximum(fpr, floor / 2), np.maximum(tpr, floor / 2), label=label, lw=1.2)
    grid = np.logspace(np.log10(floor / 2), 0, 50)
    ax.plot(grid, grid, "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _population_curves(o: TargetOutcome) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(f"{name} (AUC {a.metrics['auc']:.3f})", o.evaluated(a.scores), o.is_member)
            for name, a in o.attacks.items()]


def _canary_curves(o: TargetOutcome) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every attack on the canaries, pooled leave-one-out where it can be (crl.audit.canaries)."""
    curves = []
    for name, a in o.attacks.items():
        s, m = pooled_view(a, o.model_member, o.model_held_out)
        s, m = s[:, o.evaluation.canary].ravel(), m[:, o.evaluation.canary].ravel()
        s, m = s[~np.isnan(s)], m[~np.isnan(s)]     # held-out pairs are neither
        if m.any() and not m.all():
            tag = "" if a.pooled is not None else ", target only"
            curves.append((f"{name} (AUC {o.canaries['attacks'][name]['auc']:.3f}{tag})", s, m))
    return curves


def plot_rocs(path: Path, outcomes: list[TargetOutcome]) -> None:
    """ROC curves on log-log axes, one panel per defense, one line per attack; with canaries, a
    second panel per defense on the canaries (pooled over every model as the target)."""
    chosen = _first_seed(outcomes)
    panels = [(f"{o.defense} (seed {o.seed})", _population_curves(o)) for o in chosen]
    panels += [(f"{o.defense} (seed {o.seed}): {o.canaries['n']} {o.canaries['kind']} canaries",
                _canary_curves(o)) for o in chosen
               if o.canaries and o.model_member is not None]
    panels = [p for p in panels if p[1]]
    plt, fig, axes = _figure_grid(len(panels))
    for ax, (title, curves) in zip(axes, panels):
        _roc_panel(ax, title, curves)
    _save(fig, plt, path)
