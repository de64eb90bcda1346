"""Stage 4, the attack runner: every attack on the signals, scored on the evaluated samples
(with bootstrap intervals), on extra groups, and pooled leave-one-out over all models (on the
pool without its canaries; canaries are scored by crl.audit.canaries)."""
from __future__ import annotations

import time

import numpy as np

from crl.attacks.base import Attack, AttackContext
from crl.audit.outcome import AttackOutcome, Evaluation
from crl.metrics import attack_metrics, metrics_with_ci, thresholded_balanced_accuracy
from crl.seeding import seed_for


def _plain(extra: dict) -> dict:
    return {k: v for k, v in extra.items() if not isinstance(v, np.ndarray)}


def run_attack(name: str, attack: Attack, ctx: AttackContext, ev: Evaluation, *,
               n_boot: int) -> AttackOutcome:
    t0 = time.time()
    res = attack.run(ctx)
    sel = ev.evaluated
    metrics = metrics_with_ci(res.scores[sel], ev.members[sel], n_boot=n_boot,
                              seed=seed_for(ctx.seed, "bootstrap", name))
    extra = _plain(res.extra)
    if res.per_class_thresholds is not None:   # the honest, shadow-fitted attack accuracy
        extra["shadow_threshold_accuracy"] = thresholded_balanced_accuracy(
            res.scores[sel], ev.members[sel], ctx.target.labels[sel], res.per_class_thresholds)
    groups = {}
    for group, positives in ev.groups.items():
        gsel, gmember = ev.labels_of(positives)
        if gmember.any():
            groups[group] = attack_metrics(res.scores[gsel], gmember)
    loo = None
    if res.loo_scores is not None:
        keep = ~ev.canary
        loo = attack_metrics(res.loo_scores[:, keep].ravel(), ctx.target.member[:, keep].ravel())
    return AttackOutcome(name=name, scores=np.asarray(res.scores), metrics=metrics,
                         extra=extra, leave_one_out=loo, groups=groups,
                         seconds=time.time() - t0, pooled=res.loo_scores)


def run_attacks(attacks: dict[str, Attack], ctx: AttackContext, ev: Evaluation, *,
                n_boot: int = 200, on_attack=None) -> dict[str, AttackOutcome]:
    """Every attack in turn; on_attack(i, n, name) before attack i of n (progress)."""
    out = {}
    for i, (name, a) in enumerate(attacks.items()):
        if on_attack is not None:
            on_attack(i, len(attacks), name)
        out[name] = run_attack(name, a, ctx, ev, n_boot=n_boot)
    return out
