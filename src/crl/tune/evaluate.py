"""One setting audited on some seeds (a `Point`) and the tuning objective.

The objective of a setting is its strongest attack: the highest, over the attacks, of the
attack's metric averaged over seeds. The metric is read from the target models' own scores
when one target resolves it (an FPR level of at least 1 / its non-members, crl.metrics); where
it does not (e.g. TPR at 0.1% FPR with 100 non-members), from the pooled leave-one-out scores
over the target and every reference model, for the attacks that have them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from crl.audit import Audit, DefenseChoice, TargetOutcome
from crl.data.splits import PoolSplit
from crl.errors import CRLError
from crl.metrics import LOW_FPRS, pooled_ci
from crl.verdict import strongest

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
    def from_dict(cls, d: dict[str, Any]) -> "Point":
        return cls(**{k: v for k, v in d.items() if k not in ("strongest", "objective")})


def attack_values(outcomes: list[TargetOutcome], metric: str) -> tuple[dict[str, float], str]:
    """({attack: metric averaged over the outcomes}, source): the targets' own metric where
    every one resolves it, else each attack's pooled leave-one-out metric where it has one."""
    names = list(outcomes[0].attacks)
    if all(o.attacks[a].metrics.get(metric) is not None for o in outcomes for a in names):
        return {a: float(np.mean([o.attacks[a].metrics[metric] for o in outcomes]))
                for a in names}, TARGET
    values = {}
    for a in names:
        pooled = [(o.attacks[a].leave_one_out or {}).get(metric) for o in outcomes]
        if all(v is not None for v in pooled):
            values[a] = float(np.mean(pooled))
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
    values, source = attack_values(outcomes, metric)
    tests = [float(o.test_acc) for o in outcomes]
    point = Point(choice.name, dict(outcomes[0].params), list(seeds),
                  float(np.mean([o.train_acc for o in outcomes])), float(np.mean(tests)), tests,
                  values, source, [o.chance_warning for o in outcomes if o.chance_warning])
    return point, outcomes


def objective_interval(point: Point, outcomes: list[TargetOutcome], metric: str, *,
                       n_boot: int, seed: int) -> list[float] | None:
    """95% interval of the strongest attack's metric over seeds and samples (pooled_ci); None
    where the metric comes from leave-one-out scores (not kept per sample)."""
    if point.source != TARGET:
        return None
    a = point.strongest
    groups = [(o.evaluated(o.attacks[a].scores), o.is_member) for o in outcomes]
    _, lo, hi = pooled_ci(groups, metric, n_boot=n_boot, seed=seed)
    return None if lo is None else [lo, hi]


def check_resolvable(audit: Audit, split: PoolSplit, objective: str, metric: str) -> None:
    """A CRLError before any training when neither one target nor the leave-one-out pool of
    its reference models has the non-members to resolve the objective's FPR level."""
    if metric not in LOW_FPRS:
        return
    fpr, n = LOW_FPRS[metric], len(split.target_nonmembers)
    refs = audit.cfg.references if "references" in audit.requirements else 0
    pooled = n + refs * (len(split.target_pool) // 2)
    if fpr * pooled >= 1.0 - 1e-9:
        return
    need = math.ceil(1.0 / fpr)
    where = (f"and the leave-one-out pool of {refs} reference models about {pooled}" if refs
             else "and no attack here trains reference models (lira, rmia) for pooled "
                  "leave-one-out scores")
    raise CRLError(f"objective = {objective!r}: one target has {n} non-members {where}; "
                   f"expected at least {need} to resolve {100 * fpr:g}% FPR (more --references "
                   "or a larger --subset)")
