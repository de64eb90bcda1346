"""One setting audited on some seeds (a `Point`) and the tuning objective.

The objective of a setting is its strongest attack: the highest, over the attacks, of the
attack's metric averaged over seeds. The metric is read from the target models' own scores
when one target resolves it (an FPR level of at least 1 / its non-members,
crl.attacks.metrics); where it does not (e.g. TPR at 0.1% FPR with 100 non-members), from the
pooled leave-one-out scores
over the target and every reference model, for the attacks that have them. An attack left out
of the objective (no leave-one-out row, or one that does not resolve the level) is named with
the reason in the Point's `dropped`, which the trial record keeps. Pooled rows hold only models
trained with the setting's defense, so with `--shadow-defense none` an objective that needs
them is refused before the study starts (`check_resolvable`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crl.attacks.metrics import LOW_FPRS, cluster_replicates, percentile_interval, pooled_ci
from crl.audit import Audit, DefenseChoice, TargetOutcome
from crl.audit.canary_metrics import pooled_view
from crl.audit.verdict import strongest
from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.data.splits import PoolSplit

TARGET, POOLED = "target", "leave-one-out"


@dataclass
class Point:
    """A setting's accuracies (mean over `seeds`) and each attack's objective metric."""

    defense: str
    params: dict[str, Any]
    seeds: list[int]
    train_acc: float
    test_acc: float
    test_accs: list[float]
    attacks: dict[str, float]             # metric per attack, mean over seeds
    source: str                           # TARGET or POOLED
    warnings: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)   # attack -> why it is not counted

    @property
    def strongest(self) -> str:
        return strongest(self.attacks)

    @property
    def objective(self) -> float:
        return self.attacks[self.strongest]

    def strongest_of(self, names: list[str]) -> str | None:
        """The strongest among `names` (None when this point has none of them)."""
        return strongest({a: self.attacks[a] for a in names if a in self.attacks})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "strongest": self.strongest, "objective": self.objective}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        return cls(**{k: v for k, v in d.items() if k not in ("strongest", "objective")})


def _dropped_reason(o: TargetOutcome, attack: str, metric: str) -> str:
    a = o.attacks[attack]
    if a.leave_one_out is None:
        why = a.extra.get("loo_skipped", "the attack has no leave-one-out scores")
        return f"seed {o.seed}: no leave-one-out row ({why})"
    return (f"seed {o.seed}: the leave-one-out row does not resolve {metric} (smallest FPR "
            f"{a.leave_one_out.get('min_resolvable_fpr')})")


def attack_values(outcomes: list[TargetOutcome], metric: str,
                  dropped: dict[str, str] | None = None) -> tuple[dict[str, float], str]:
    """({attack: metric averaged over the outcomes}, source): the targets' own metric where
    every one resolves it, else each attack's pooled leave-one-out metric where it has one;
    an attack left out is named with the reason in `dropped` (when given)."""
    names = list(outcomes[0].attacks)
    if all(o.attacks[a].metrics.get(metric) is not None for o in outcomes for a in names):
        return {a: float(np.mean([o.attacks[a].metrics[metric] for o in outcomes]))
                for a in names}, TARGET
    values = {}
    for a in names:
        pooled = [(o.attacks[a].leave_one_out or {}).get(metric) for o in outcomes]
        if all(v is not None for v in pooled):
            values[a] = float(np.mean(pooled))
        elif dropped is not None:
            dropped[a] = "; ".join(_dropped_reason(o, a, metric) for o, v in zip(outcomes, pooled)
                                   if v is None)
    if not values:
        raise CRLError(f"objective {metric}: no attack resolves it, neither on one target nor "
                       "pooled leave-one-out; expected more non-members (--subset) or reference "
                       "models (--references)")
    return values, POOLED


def evaluate_setting(audit: Audit, splits: dict[int, PoolSplit], choice: DefenseChoice,
                     seeds: list[int], metric: str) -> tuple[Point, list[TargetOutcome]]:
    """Audit `choice` on every seed through the audit's stages (models from the cache where
    it has them); nothing is written to a run directory."""
    audit.check(choice, splits[seeds[0]])
    outcomes = [audit.audit_one(choice, s, splits[s]) for s in seeds]
    dropped: dict[str, str] = {}
    values, source = attack_values(outcomes, metric, dropped)
    tests = [float(o.test_acc) for o in outcomes]
    point = Point(choice.name, dict(outcomes[0].params), list(seeds),
                  float(np.mean([o.train_acc for o in outcomes])), float(np.mean(tests)), tests,
                  values, source, [o.chance_warning for o in outcomes if o.chance_warning],
                  dropped)
    return point, outcomes


def objective_interval(point: Point, outcomes: list[TargetOutcome], metric: str, *,
                       n_boot: int, seed: int) -> list[float] | None:
    """95% interval of the strongest attack's metric over seeds and samples (pooled_ci); from
    leave-one-out scores, the mean over seeds of bootstrap replicates clustered by sample
    (`pooled_interval`)."""
    a = point.strongest
    if point.source != TARGET:
        return pooled_interval(outcomes, a, metric, n_boot=n_boot, seed=seed)
    groups = [(o.evaluated(o.attacks[a].scores), o.is_member) for o in outcomes]
    _, lo, hi = pooled_ci(groups, metric, n_boot=n_boot, seed=seed)
    return None if lo is None else [lo, hi]


def _pooled_pairs(o: TargetOutcome, attack: str) -> tuple[np.ndarray, ...]:
    """(scores, membership, sample ids) of the leave-one-out pairs of `o` (no canaries, no
    held-out pairs), as the leave-one-out row pools them."""
    keep = ~o.evaluation.canary
    s, m = pooled_view(o.attacks[attack], o.model_member, o.model_held_out)
    s, m = s[:, keep], m[:, keep]
    ids = np.broadcast_to(o.evaluation.sample_idx[keep], s.shape)
    ok = ~np.isnan(s)
    return s[ok], m[ok], ids[ok]


def pooled_interval(outcomes: list[TargetOutcome], attack: str, metric: str, *, n_boot: int,
                    seed: int) -> list[float] | None:
    """95% interval of the mean over seeds of `attack`'s leave-one-out `metric`: each seed's
    samples resampled (every pair of a drawn sample counted as often as it is drawn), the
    replicates averaged over seeds."""
    reps = []
    for o in outcomes:
        if o.attacks[attack].pooled is None or o.model_member is None:
            return None
        s, m, ids = _pooled_pairs(o, attack)
        rng = numpy_rng(seed, "bootstrap", o.seed)
        reps.append(cluster_replicates(s, m, ids, n_boot, rng, (metric,))[metric])
    return percentile_interval(np.mean(reps, axis=0), 0.95)


def check_resolvable(audit: Audit, split: PoolSplit, objective: str, metric: str) -> None:
    """A CRLError before any training when neither one target nor the leave-one-out pool of
    its reference models has the non-members to resolve the objective's FPR level, or when
    that pool would mix in models trained without the tuned defense (--shadow-defense none)."""
    if metric not in LOW_FPRS:
        return
    fpr, n = LOW_FPRS[metric], len(split.target_nonmembers)
    if fpr * n >= 1.0 - 1e-9:
        return
    need = math.ceil(1.0 / fpr)
    if audit.cfg.shadow_defense != "same":
        raise CRLError(f"objective = {objective!r}: one target has {n} non-members, fewer than "
                       f"the {need} that resolve {100 * fpr:g}% FPR, and with --shadow-defense "
                       f"{audit.cfg.shadow_defense} the reference models train without the "
                       "tuned defense, so no pooled leave-one-out row exists; expected "
                       "--shadow-defense same or a larger --subset")
    refs = audit.cfg.references if "references" in audit.requirements else 0
    pooled = len(split.target_pool) if refs >= 2 else n    # distinct non-member samples
    if fpr * pooled >= 1.0 - 1e-9:
        return
    where = (f"and the leave-one-out pool of {refs} reference models {pooled} distinct "
             "non-member samples" if refs >= 2
             else "and no attack here trains reference models (lira, rmia) for pooled "
                  "leave-one-out scores")
    raise CRLError(f"objective = {objective!r}: one target has {n} non-members {where}; "
                   f"expected at least {need} to resolve {100 * fpr:g}% FPR (a larger --subset"
                   + ("" if refs >= 2 else " or --attacks with lira or rmia") + ")")
