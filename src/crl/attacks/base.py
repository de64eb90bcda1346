"""The Attack interface: every attack is a function of Signals (plus, for Grad-x, the model).

`crl audit` builds one AttackContext per (defense, seed) and runs each requested attack on it.
An attack returns membership scores (higher = member) for the target pool's samples for one
or more target models; metrics are computed by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from crl.attacks.signals import Signals
from crl.errors import CRLError
from crl.registry import ATTACKS


@dataclass
class AttackContext:
    """What attacks may use.

    target: signals on the target pool. Model 0 is THE target (trained on the target members);
        models 1.. are reference models trained on random halves of the target pool (present
        only when some attack needs references). member[0] is the ground truth to evaluate.
    shadow: k shadow models on the shadow pool (the paper's protocol), when an attack needs them.
    population: logits of the target-pool models on population samples that none of them
        trained on (the shadow pool), same model order as `target`; for RMIA.
    gradient_scores: callable(model_index) -> per-sample Grad-x norms on the target pool.
    """

    target: Signals
    num_classes: int
    seed: int = 0
    shadow: Signals | None = None
    population: Signals | None = None
    gradient_scores: Callable[[int], np.ndarray] | None = None
    shadow_gradient_scores: Callable[[int], np.ndarray] | None = None


@dataclass
class AttackResult:
    """Scores of the target model (model 0) and, optionally, leave-one-out scores of all models."""

    scores: np.ndarray                       # [N] for model 0
    extra: dict[str, Any] = field(default_factory=dict)
    loo_scores: np.ndarray | None = None     # [M, N] every model as the target (LiRA/RMIA)
    per_class_thresholds: np.ndarray | None = None  # fitted on shadows (threshold attacks)


class Attack:
    """Base class. `needs` lists what the context must hold: 'shadows', 'references', 'model'."""

    name: str = ""
    needs: frozenset[str] = frozenset()
    uses: frozenset[str] = frozenset()   # optional extras (threshold attacks: shadows)
    min_references: int = 0
    defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise CRLError(f"unknown parameter '{self.name}.{unknown[0]}'; {self.name} takes: {valid}")
        self.params: dict[str, Any] = {**self.defaults, **params}

    def run(self, ctx: AttackContext) -> AttackResult:
        raise NotImplementedError


def build_attack(name: str, params: dict[str, Any] | None = None) -> Attack:
    return ATTACKS.get(name)(**(params or {}))


def leave_one_out(score_of: Callable[[int], np.ndarray], num_models: int,
                  target_scores: np.ndarray, extra: dict[str, Any]) -> np.ndarray | None:
    """Scores of every model as the target, [M, N]; None (reason in extra['loo_skipped']) when
    some model other than model 0 lacks the references an attack needs."""
    try:
        return np.stack([target_scores] + [score_of(t) for t in range(1, num_models)])
    except CRLError as e:
        extra["loo_skipped"] = str(e)
        return None
