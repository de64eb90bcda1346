"""The Attack interface: every attack is a function of Signals (plus, for Grad-x, gradient norms).

An attack declares its parameters once (`spec`, a crl.core.params.ParamSpec) and what the signal
stage must extract for it (`requirements()`, from REQUIREMENTS) or may extract to improve it
(`optional_inputs()`), so the caller never inspects an attack's internals. The caller builds one
AttackContext per (defense, seed) holding what was asked for and runs each attack on it. An
attack returns membership scores (higher = member) for the target pool's samples for one or more
target models; metrics are computed by the caller (crl.attacks.metrics).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from crl.attacks.signals import Signals
from crl.core.errors import CRLError
from crl.core.params import ParamSpec
from crl.core.registry import ATTACKS

#: What an attack can ask the signal stage for:
#:   references       reference models trained on random halves of the target pool (ctx.target
#:                    models 1..; how many: Attack.min_references)
#:   shadows          shadow models on the shadow pool (ctx.shadow)
#:   population       the target-pool models' logits on samples none trained on (ctx.population)
#:   flip             logits on horizontally flipped inputs (Signals.logits_flip) for every pool
#:   input_gradients  per-sample input-gradient norms (ctx.gradient_scores, and
#:                    ctx.shadow_gradient_scores when shadows are extracted too)
#:   oracle           query access to the pool models on inputs the attack builds
#:                    (ctx.queries, crl.models.query.QueryAccess; label-only oracles by default)
REQUIREMENTS = frozenset({"references", "shadows", "population", "flip", "input_gradients",
                          "oracle"})


@dataclass
class AttackContext:
    """What attacks may use.

    target: signals on the target pool. Model 0 is THE target (trained on the target members);
        models 1.. are reference models trained on random halves of the target pool (present
        only when some attack requires references). member[0] is the ground truth to evaluate.
    shadow: k shadow models on the shadow pool (the paper's protocol), when an attack uses them.
    population: logits of the target-pool models on population samples that none of them
        trained on (the shadow pool), same model order as `target`; for RMIA.
    gradient_scores: callable(model_index) -> per-sample Grad-x norms on the target pool.
    shadow_gradient_scores: the same for the shadow models on the shadow pool.
    queries: the target pool's images and an oracle per pool model (crl.models.query.QueryAccess).
    seed: the run seed; an attack that draws randomness derives its streams from it by name.
    """

    target: Signals
    num_classes: int
    seed: int = 0
    shadow: Signals | None = None
    population: Signals | None = None
    gradient_scores: Callable[[int], np.ndarray] | None = None
    shadow_gradient_scores: Callable[[int], np.ndarray] | None = None
    queries: Any = None   # crl.models.query.QueryAccess (Any: attacks.base stays free of torch)


@dataclass
class AttackResult:
    """Scores of the target model (model 0) and, optionally, leave-one-out scores of all models.

    scored: which samples the attack scored ([N] bool; None: all). An attack on a sample budget
    (the boundary attacks) scores only some; the others' entries in `scores` mean nothing and
    never enter a metric (`target_scores` turns them into NaN, crl.attacks.metrics leaves NaN out).
    Such an attack gives no leave-one-out scores."""

    scores: np.ndarray                       # [N] for model 0
    extra: dict[str, Any] = field(default_factory=dict)
    loo_scores: np.ndarray | None = None     # [M, N] every model as the target (LiRA/RMIA)
    per_class_thresholds: np.ndarray | None = None  # fitted on shadows (threshold attacks)
    scored: np.ndarray | None = None         # [N] bool: the samples scored (None: all)

    def __post_init__(self) -> None:
        if self.scored is None:
            return
        self.scored = np.asarray(self.scored)
        if self.scored.dtype != bool or self.scored.shape != np.shape(self.scores):
            raise CRLError(f"AttackResult.scored of dtype {self.scored.dtype}, shape "
                           f"{self.scored.shape}: expected a bool mask of shape "
                           f"{np.shape(self.scores)} (one per score)")
        if self.loo_scores is not None:
            raise CRLError("AttackResult.scored with loo_scores: expected an attack on a "
                           "sample budget to score the target alone (no leave-one-out)")

    def target_scores(self) -> np.ndarray:
        """[N] float scores of model 0, NaN where not scored."""
        s = np.asarray(self.scores, dtype=np.float64)
        return s if self.scored is None else np.where(self.scored, s, np.nan)


class Attack:
    """Base class. `name` is set by the registry; `spec` declares the parameters, resolved into
    `params` (unknown names and bad values raise a one-line CRLError)."""

    name: ClassVar[str] = ""
    spec: ClassVar[ParamSpec] = ParamSpec()

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = self.spec.resolve(self.name, params)

    def requirements(self) -> frozenset[str]:
        """What the signal stage must extract for this attack (a subset of REQUIREMENTS)."""
        return frozenset()

    def optional_inputs(self) -> frozenset[str]:
        """What this attack uses when present but can run without (a subset of REQUIREMENTS)."""
        return frozenset()

    @property
    def min_references(self) -> int:
        """Reference models needed (0 unless 'references' is required), given the params."""
        return 0

    @property
    def per_sample_references(self) -> tuple[int, int]:
        """(IN, OUT): the reference models every sample needs among the models other than the
        one scored, IN (trained on it) and OUT (neither trained on it nor held it out)."""
        return 0, 0

    def run(self, ctx: AttackContext) -> AttackResult:
        raise NotImplementedError


def build_attack(name: str, params: dict[str, Any] | None = None) -> Attack:
    """Create a registered attack by name with parameters `params` (checked by its spec)."""
    return ATTACKS.get(name)(params)


def leave_one_out(score_of: Callable[[int], np.ndarray], num_models: int,
                  target_scores: np.ndarray, extra: dict[str, Any]) -> np.ndarray | None:
    """Scores of every model as the target, [M, N]; None (reason in extra['loo_skipped']) when
    some model other than model 0 lacks the references an attack needs."""
    try:
        return np.stack([target_scores] + [score_of(t) for t in range(1, num_models)])
    except CRLError as e:
        extra["loo_skipped"] = str(e)
        return None
