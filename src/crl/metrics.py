"""Membership-inference metrics: AUC, TPR at low FPR, balanced accuracy, ROC curves.

Scores are oriented "higher = member". All values are floats in [0, 1].
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from crl.errors import CRLError

LOW_FPRS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001, "tpr_at_0.01pct_fpr": 0.0001}


def _check(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).ravel()
    if s.shape != m.shape:
        raise CRLError(f"scores and is_member differ in length: {s.shape[0]} vs {m.shape[0]}")
    if not np.isin(m, [0, 1]).all():
        raise CRLError("is_member must hold only 0/1 or booleans")
    m = m.astype(bool)
    if m.all() or not m.any():
        raise CRLError("attack metrics need both members and non-members")
    if not np.isfinite(s).all():
        raise CRLError(f"{int((~np.isfinite(s)).sum())} membership scores are NaN or infinite")
    return s, m


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among ROC points whose FPR does not exceed `target` (no interpolation)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def attack_metrics(scores, is_member) -> dict[str, float]:
    """AUC, TPR at 1% / 0.1% FPR (and 0.01% when resolvable) and best balanced accuracy.

    TPR at an FPR below 1 / (number of non-members) cannot be resolved: such a key is
    omitted and `min_resolvable_fpr` says why.
    """
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s)
    n_out = int((~m).sum())
    out = {"auc": float(roc_auc_score(m, s))}
    for key, target in LOW_FPRS.items():
        if target * n_out >= 1.0 or key != "tpr_at_0.01pct_fpr":
            out[key] = tpr_at_fpr(fpr, tpr, target)
    out["balanced_accuracy"] = float(np.max((tpr + 1.0 - fpr) / 2.0))
    out["min_resolvable_fpr"] = 1.0 / n_out
    return out


def roc(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve."""
    s, m = _check(scores, is_member)
    fpr, tpr, _ = roc_curve(m, s)
    return fpr, tpr


def fit_per_class_thresholds(scores, is_member, labels, num_classes: int) -> np.ndarray:
    """Per-class thresholds maximising balanced accuracy on (shadow) scores; member iff s >= t.

    A class with no members or no non-members gets the global best threshold.
    """
    s, m = _check(scores, is_member)
    labels = np.asarray(labels).ravel()
    global_t = _best_threshold(s, m)
    out = np.full(num_classes, global_t)
    for c in range(num_classes):
        sel = labels == c
        if m[sel].any() and (~m[sel]).any():
            out[c] = _best_threshold(s[sel], m[sel])
    return out


def _best_threshold(s: np.ndarray, m: np.ndarray) -> float:
    fpr, tpr, thr = roc_curve(m, s)
    i = int(np.argmax(tpr + 1.0 - fpr))
    return float(min(thr[i], np.finfo(np.float64).max))


def thresholded_balanced_accuracy(scores, is_member, labels, thresholds: np.ndarray) -> float:
    """Balanced accuracy of the rule `member iff score >= thresholds[label]`."""
    s, m = _check(scores, is_member)
    pred = s >= np.asarray(thresholds)[np.asarray(labels).ravel()]
    return float(0.5 * (pred[m].mean() + (~pred[~m]).mean()))
