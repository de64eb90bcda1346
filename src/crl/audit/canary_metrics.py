"""Worst-case metrics (--canaries) and per-sample exposure, from every pool model's scores.

Pooled leave-one-out: each pool model (the target and every reference model) in turn is the
target, scored against the others (the attacks' `loo_scores`), and its (score, membership)
pairs on the samples asked for are pooled over the models. Only models trained with the
target's defense are pooled (crl.audit.attacking), and a pair of a model and a sample it held out
of training is left out (its score is NaN in `pooled_view`). An attack without leave-one-out
scores (the NN attack, Grad-x), or whose reference models trained without the target's defense,
is scored on the target alone: `pooled` is false and `models` is 1.

Resolvable FPRs: the non-member pairs come from few distinct samples (each sample is a
non-member of about half the models), and pairs of one sample move together, so a pooled row
reports TPR only at FPR levels of at least 1 / (distinct non-member samples)
(`min_resolvable_fpr`); lower levels are null.

Intervals: the bootstrap resamples samples, not (model, sample) pairs: a sample's scores in
every model (and every seed) move together, since a sample that leaks in one model tends to
leak in all of them; resampling pairs would understate the uncertainty.

Exposure (the issue's definition): over the models that trained on a sample, the fraction whose
score for it exceeds that model's threshold at `fpr`, the threshold set on that model's own
non-members so that at most floor(fpr x non-members) of them exceed it (with fewer than 1 / fpr
non-members: none of them, a stricter FPR than asked).
"""
from __future__ import annotations

import numpy as np

from crl.attacks.metrics import LOW_FPRS, clustered_metrics_with_ci
from crl.audit.outcome import AttackOutcome, Exposure
from crl.audit.verdict import strongest
from crl.core.seeding import seed_for
from crl.data.types import ImageData

EXPOSURE_FPR = 0.001
TOP_EXPOSED = 16


def pooled_view(attack: AttackOutcome, member: np.ndarray,
                held_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores and membership [M, N]: every model as the target when the attack gave
    leave-one-out scores, else the target alone ([1, N]); scores are NaN where the model held
    the sample out of training (held_out [models, N]): such a pair is neither."""
    member = np.asarray(member, bool)
    if attack.pooled is not None:
        scores = np.asarray(attack.pooled, dtype=np.float64)
    else:
        scores, member = np.asarray(attack.scores, dtype=np.float64)[None], member[:1]
    if held_out is not None:
        scores = np.where(np.asarray(held_out, bool)[: len(scores)], np.nan, scores)
    return scores, member


def pooled_metrics(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *, n_boot: int,
                   seed: int) -> dict:
    """Metrics with intervals clustered by sample of parts = [(scores [M, N], member [M, N],
    sample ids [N])] (e.g. one per seed), pooled; NaN scores (held-out pairs) are left out.
    TPR levels below 1 / (distinct non-member samples) are null. `models` = models per part
    (summed), `nonmember_samples`; `skipped` when the pairs hold no member or no non-member."""
    s = np.concatenate([p[0].ravel() for p in parts])
    m = np.concatenate([p[1].ravel() for p in parts])
    ids = np.concatenate([np.broadcast_to(p[2], p[0].shape).ravel() for p in parts])
    models = int(sum(p[0].shape[0] for p in parts))
    keep = ~np.isnan(s)
    s, m, ids = s[keep], m[keep], ids[keep]
    if m.all() or not m.any():
        return {"models": models, "skipped": f"{int(m.sum())} member and {int((~m).sum())} "
                                             "non-member pairs: both are needed"}
    out = clustered_metrics_with_ci(s, m, ids, n_boot=n_boot, seed=seed)
    distinct = int(np.unique(ids[~m]).size)
    for key, fpr in LOW_FPRS.items():
        if fpr * distinct < 1.0 - 1e-9:
            out[key] = out[f"{key}_ci"] = None
    return {**out, "min_resolvable_fpr": 1.0 / distinct, "nonmember_samples": distinct,
            "models": models}


def subset_metrics(attacks: dict[str, AttackOutcome], member: np.ndarray,
                   sample_idx: np.ndarray, columns: np.ndarray, *, n_boot: int,
                   seed: int, held_out: np.ndarray | None = None) -> dict[str, dict]:
    """Every attack scored on the pool samples `columns` (a mask), pooled leave-one-out where
    the attack allows it (`pooled`), with intervals over samples."""
    out = {}
    for name, attack in attacks.items():
        s, m = pooled_view(attack, member, held_out)
        metrics = pooled_metrics([(s[:, columns], m[:, columns], sample_idx[columns])],
                                 n_boot=n_boot, seed=seed_for(seed, "worst-case", name))
        out[name] = {**metrics, "pooled": attack.pooled is not None}
    return out


def exposure_thresholds(scores: np.ndarray, member: np.ndarray, fpr: float) -> np.ndarray:
    """[M]: per model, the score that at most floor(fpr x its non-members) non-members exceed
    (+inf for a model without non-members); NaN scores (held-out pairs) are neither."""
    out = np.full(scores.shape[0], np.inf)
    for k, (s, m) in enumerate(zip(scores, member)):
        out_scores = np.sort(s[~m & ~np.isnan(s)])[::-1]
        allowed = int(np.floor(fpr * len(out_scores) + 1e-9))
        if len(out_scores):
            out[k] = out_scores[min(allowed, len(out_scores) - 1)]
    return out


def exposure_values(scores: np.ndarray, member: np.ndarray,
                    thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: exposure (NaN where no model trained on it), the number of models that
    trained on it, and the median over those of score minus threshold (for ranking ties)."""
    member = member & ~np.isnan(scores)   # a NaN pair (held out, not scored) is neither
    above = scores > thresholds[:, None]
    n_in = member.sum(0)
    values = np.full(scores.shape[1], np.nan)
    has = n_in > 0
    values[has] = (above & member).sum(0)[has] / n_in[has]
    margin = np.full(scores.shape[1], -np.inf)
    gap = np.where(member, scores - thresholds[:, None], np.nan)
    margin[has] = np.nanmedian(gap[:, has], axis=0)
    return values, n_in, margin


def exposure_attack(attacks: dict[str, AttackOutcome]) -> str:
    """LiRA if it ran, else the strongest attack: highest pooled AUC among those with
    leave-one-out scores, else highest target AUC."""
    if "lira" in attacks:
        return "lira"
    pooled = {k: a.leave_one_out["auc"] for k, a in attacks.items() if a.leave_one_out is not None}
    return strongest(pooled) or strongest({k: a.metrics["auc"] for k, a in attacks.items()})


def exposure_of(attacks: dict[str, AttackOutcome], member: np.ndarray, data: ImageData,
                sample_idx: np.ndarray, *, fpr: float = EXPOSURE_FPR,
                top: int = TOP_EXPOSED, held_out: np.ndarray | None = None) -> Exposure:
    """The per-sample exposure of the pool by `exposure_attack`, and the `top` most exposed
    samples (pool positions, most exposed first) with their images."""
    name = exposure_attack(attacks)
    scores, m = pooled_view(attacks[name], member, held_out)
    thresholds = exposure_thresholds(scores, m, fpr)
    values, n_in, margin = exposure_values(scores, m, thresholds)
    order = np.lexsort((-margin, -np.nan_to_num(values, nan=-1.0)))
    best = order[np.isfinite(values[order])][:top]
    return Exposure(name, fpr, values, n_in, thresholds, best,
                    data.x[sample_idx[best]].numpy())
