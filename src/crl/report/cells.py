"""How one metric is written in a table cell: AUC as a fraction, TPRs in percent, an interval in
brackets, "n/a" when unresolvable. tables.py and worst_case.py both write cells (neither
imports the other for it)."""
from __future__ import annotations


def percent_scale(metric: str) -> float:
    """1 for AUC, 100 for the TPRs (written in percent)."""
    return 1.0 if metric == "auc" else 100.0


def format_metric(v: float | None, metric: str) -> str:
    """AUC with 3 decimals, a TPR in percent with 1; None as "n/a"."""
    if v is None:
        return "n/a"
    scaled = v * percent_scale(metric)
    return f"{scaled:.3f}" if metric == "auc" else f"{scaled:.1f}"


def metric_cell(m: dict, metric: str) -> str:
    """`metric` of `m` as "value [lo, hi]" (n/a when unresolvable)."""
    if m.get(metric) is None:
        return "n/a"
    lo, hi = m.get(f"{metric}_ci") or (None, None)
    return (f"{format_metric(m[metric], metric)} [{format_metric(lo, metric)}, "
            f"{format_metric(hi, metric)}]")
