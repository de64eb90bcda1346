"""report.md in the paper's Table 1 layout (mean ± std over seeds), plus CSV-free JSON rows."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from crl.utils import write_text_atomic


def _mean_std(values: list[float], pct: bool = False) -> str:
    v = np.asarray(values, dtype=np.float64) * (100.0 if pct else 1.0)
    digits = 1 if pct else 3
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _grouped(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["defense"]].append(r)
    return groups


def format_table(rows: list[dict[str, Any]], metric: str = "auc") -> str:
    """Markdown table: one row per defense; train/test accuracy (%), then `metric` per attack."""
    if not rows:
        return "(no results)"
    attacks = list(rows[0]["attacks"])
    pct = metric != "auc"
    head = ["Defense", "Train acc %", "Test acc %"] + attacks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for defense, group in _grouped(rows).items():
        cells = [defense, _mean_std([r["train_acc"] for r in group], pct=True),
                 _mean_std([r["test_acc"] for r in group], pct=True)]
        for a in attacks:
            vals = [r["attacks"][a][metric] for r in group if metric in r["attacks"][a]]
            cells.append(_mean_std(vals, pct=pct) if vals else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, rows: list[dict[str, Any]], outcomes: list[dict[str, Any]],
                 cfg) -> str:
    """Write report.md, figures/*.png and vulnerability files; return the AUC table."""
    from crl.report.plots import plot_margins, plot_rocs
    from crl.report.vulnerability import write_vulnerability

    figures = out / "figures"
    plot_margins(figures / "margins.png", outcomes)
    plot_rocs(figures / "roc.png", outcomes)
    write_vulnerability(out / "vulnerability", outcomes)

    seeds = sorted({r["seed"] for r in rows})
    n_m, n_n = rows[0]["n_members"], rows[0]["n_nonmembers"]
    auc = format_table(rows, "auc")
    parts = [
        f"# Membership-inference audit: {cfg.dataset} / {cfg.model}",
        "",
        f"{n_m} members and {n_n} non-members per target; seeds {seeds} "
        f"(mean ± std over seeds); {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}; "
        f"{cfg.shadows} shadow models, {cfg.references} reference models (LiRA/RMIA).",
        "",
        "## Attack AUC (the paper's Table 1 layout)",
        "", auc, "",
        "## TPR at 1% FPR (%)", "", format_table(rows, "tpr_at_1pct_fpr"), "",
        "## TPR at 0.1% FPR (%)", "", format_table(rows, "tpr_at_0.1pct_fpr"), "",
    ]
    if 0.001 * n_n < 1:
        parts += [f"With {n_n} non-members the smallest FPR one target can resolve is "
                  f"{100.0 / n_n:.2f}%: its TPR at 0.1% FPR means TPR at zero false positives. "
                  "LiRA/RMIA's leave-one-out rows in results.json pool every model and resolve "
                  "lower FPRs.", ""]
    if any("leave_one_out" in a for a in rows[0]["attacks"].values()):
        loo = [{**r, "attacks": {k: v["leave_one_out"] for k, v in r["attacks"].items()
                                 if "leave_one_out" in v}} for r in rows]
        parts += ["## Leave-one-out over all reference models (every model as the target)", "",
                  "AUC:", "", format_table(loo, "auc"), "",
                  "TPR at 0.1% FPR (%):", "", format_table(loo, "tpr_at_0.1pct_fpr"), ""]
    if any("shadow_threshold_accuracy" in a for a in rows[0]["attacks"].values()):
        acc = [{**r, "attacks": {k: v for k, v in r["attacks"].items()
                                 if "shadow_threshold_accuracy" in v}} for r in rows]
        parts += ["## Attack accuracy with per-class thresholds fitted on shadow models (%)", "",
                  format_table(acc, "shadow_threshold_accuracy"), ""]
    parts += ["## Figures", "", "![margins](figures/margins.png)", "", "![roc](figures/roc.png)",
              "", "Most exposed training samples per attack: `vulnerability/`.", ""]
    write_text_atomic(out / "report.md", "\n".join(parts))
    return auc
