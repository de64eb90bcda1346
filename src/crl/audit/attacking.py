"""Stage 4, the attack runner: every attack on the signals, scored on the evaluated samples
(with bootstrap intervals), on extra groups, and pooled leave-one-out over all models (on the
pool without its canaries; canaries are scored by crl.audit.canary_metrics).

The leave-one-out row pools only models trained with the target's defense: when the reference
models are not (`--shadow-defense none`), the row is null and `loo_skipped` says why. Pairs of
a model and a sample it held out of training are left out. Its intervals resample samples
(crl.audit.canary_metrics.pooled_metrics), and its TPR levels stop at 1 / (distinct non-member
samples)."""
from __future__ import annotations

import time

import numpy as np

from crl.attacks.base import Attack, AttackContext
from crl.attacks.metrics import attack_metrics, metrics_with_ci, thresholded_balanced_accuracy
from crl.audit.canary_metrics import pooled_metrics
from crl.audit.outcome import AttackOutcome, Evaluation
from crl.core.errors import CRLError
from crl.core.seeding import seed_for


def _plain(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not isinstance(v, np.ndarray)}


def leave_one_out_row(loo_scores: np.ndarray, ctx: AttackContext, ev: Evaluation, *,
                      n_boot: int, seed: int) -> dict:
    """Pooled metrics of every model as the target on the pool without canaries, without the
    (model, sample) pairs the model held out; intervals clustered by sample."""
    keep = ~ev.canary
    scores = np.where(ctx.target.held_out, np.nan, loo_scores)
    return pooled_metrics([(scores[:, keep], ctx.target.member[:, keep], ev.sample_idx[keep])],
                          n_boot=n_boot, seed=seed)


def run_attack(name: str, attack: Attack, ctx: AttackContext, ev: Evaluation, *,
               n_boot: int, unpooled: str | None = None) -> AttackOutcome:
    """`attack` on the target; `unpooled`: why the models may not be pooled (then no
    leave-one-out row)."""
    t0 = time.time()
    res = attack.run(ctx)
    scores, sel = res.target_scores(), ev.evaluated   # NaN: not scored (sample budget)
    if res.scored is None and np.isnan(scores[sel]).any():
        raise CRLError(f"attack '{name}': {int(np.isnan(scores[sel]).sum())} membership "
                       "scores are NaN")
    metrics = metrics_with_ci(scores[sel], ev.members[sel], n_boot=n_boot,
                              seed=seed_for(ctx.seed, "bootstrap", name))
    extra = _plain(res.extra)
    if res.scored is not None:
        extra["samples_scored"], extra["samples_evaluated"] = int(res.scored[sel].sum()), int(
            sel.sum())
    if res.per_class_thresholds is not None:   # the honest, shadow-fitted attack accuracy
        extra["shadow_threshold_accuracy"] = thresholded_balanced_accuracy(
            scores[sel], ev.members[sel], ctx.target.labels[sel], res.per_class_thresholds)
    groups = {}
    for group, positives in ev.groups.items():
        gsel, gmember = ev.labels_of(positives)
        if len(set(gmember[~np.isnan(scores[gsel])])) == 2:   # scored members and non-members
            groups[group] = attack_metrics(scores[gsel], gmember)
    loo, pooled = None, res.loo_scores
    if pooled is not None and unpooled is not None:
        extra["loo_skipped"], pooled = unpooled, None
    if pooled is not None:
        loo = leave_one_out_row(pooled, ctx, ev, n_boot=n_boot,
                                seed=seed_for(ctx.seed, "bootstrap", name, "leave-one-out"))
        if loo.get("skipped"):
            extra["loo_skipped"], loo = loo["skipped"], None
    return AttackOutcome(name=name, scores=scores, metrics=metrics,
                         extra=extra, leave_one_out=loo, groups=groups,
                         seconds=time.time() - t0, pooled=pooled)


def run_attacks(attacks: dict[str, Attack], ctx: AttackContext, ev: Evaluation, *,
                n_boot: int, unpooled: str | None = None,
                on_attack=None) -> dict[str, AttackOutcome]:
    """Every attack in turn; on_attack(i, n, name) before attack i of n (progress)."""
    out = {}
    for i, (name, a) in enumerate(attacks.items()):
        if on_attack is not None:
            on_attack(i, len(attacks), name)
        out[name] = run_attack(name, a, ctx, ev, n_boot=n_boot, unpooled=unpooled)
    return out
