"""Figures: logit-margin histograms (paper Fig. 6) and ROC curves on log-log axes.

Every figure is one column of panels FIG_WIDTH inches wide at DPI, every text FONT_PT points
or more, legends below the axes: the report shows a figure at most at its natural width, so at
390 px (a phone) its text still renders at about 10 px or more (tests/report/test_html.py)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from crl.attacks.metrics import roc
from crl.audit.canary_metrics import pooled_view
from crl.audit.outcome import TargetOutcome
from crl.core.utils import atomic_path

FONT_PT, DPI, FIG_WIDTH = 11, 100, 5.0


def figure_grid(n: int, width: float = FIG_WIDTH, height: float = 4.4, cols: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize",
             "ytick.labelsize", "legend.fontsize")
    plt.rcParams.update(dict.fromkeys(sizes, FONT_PT))
    n, cols = max(n, 1), min(max(n, 1), cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             layout="constrained")
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


def save_figure(fig, plt, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)


def plot_margins(path: Path, outcomes: list[TargetOutcome]) -> None:
    """Histograms of g_y - max_{i!=y} g_i on members vs non-members, one panel per defense."""
    chosen = _first_seed(outcomes)
    plt, fig, axes = figure_grid(len(chosen))
    for ax, o in zip(axes, chosen):
        m, member = o.evaluated(o.margins), o.is_member
        lo, hi = np.percentile(m, [0.5, 99.5])
        bins = np.linspace(lo, hi, 40)
        ax.hist(m[member], bins=bins, alpha=0.6, label="members", color="tab:red", density=True)
        ax.hist(m[~member], bins=bins, alpha=0.6, label="non-members", color="tab:blue",
                density=True)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{o.defense} (seed {o.seed}): train {100 * o.train_acc:.1f}%, "
                     f"test {100 * o.test_acc:.1f}%")
        ax.set_xlabel("logit margin to the decision boundary")
        ax.set_ylabel("density")
        _legend_below(ax)
    save_figure(fig, plt, path)


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
    ax.set_title(title)
    _legend_below(ax)


def _legend_below(ax) -> None:
    """The legend under the axes, outside every curve."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def _population_curves(o: TargetOutcome) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(f"{name} (AUC {a.metrics['auc']:.3f})", o.evaluated(a.scores), o.is_member)
            for name, a in o.attacks.items()]


def _canary_curves(o: TargetOutcome) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every attack on the canaries, pooled leave-one-out where it can be
    (crl.audit.canary_metrics)."""
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
    plt, fig, axes = figure_grid(len(panels))
    for ax, (title, curves) in zip(axes, panels):
        _roc_panel(ax, title, curves)
    save_figure(fig, plt, path)


def _outcome(outcomes: list[TargetOutcome], defense: str, seed: int) -> TargetOutcome:
    return next(o for o in outcomes if o.defense == defense and o.seed == seed)


def plot_verdict_rocs(folder: Path, outcomes: list[TargetOutcome], verdict: dict) -> list[str]:
    """figures/roc_<defense>.png per defense of the verdict: the strongest attack by AUC on the
    baseline and on the defense (first shared seed) on the same log-log axes; the paths
    relative to the run directory."""
    paths = []
    for v in verdict["defenses"]:
        c = v["strongest"].get("auc")
        if c is None:
            continue
        seed, base = v["seeds"][0], verdict["baseline"]
        curves = []
        for defense, attack in ((base, c["baseline_attack"]), (v["defense"], c["attack"])):
            o = _outcome(outcomes, defense, seed)
            curves.append((f"{defense}: {attack} (AUC {o.attacks[attack].metrics['auc']:.3f})",
                           o.evaluated(o.attacks[attack].scores), o.is_member))
        name = f"roc_{re.sub(r'[^A-Za-z0-9_-]+', '_', v['defense'])}.png"
        plt, fig, axes = figure_grid(1)
        _roc_panel(next(iter(axes)), f"{v['defense']} vs {base}, strongest attack (seed {seed})",
                   curves)
        save_figure(fig, plt, folder / name)
        paths.append(f"figures/{name}")
    return paths
