"""Threshold attacks on one model's outputs (Yeom et al. 2018; Song & Mittal 2021).

Every score is oriented "higher = member" and computed in float64 from the logits with
log-space formulas, so that confident predictions (margins of 50 and more) do not collapse
into ties the way float32 softmax does.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from sklearn.metrics import roc_curve

from crl.attacks.base import Attack, AttackContext, AttackResult
from crl.attacks.scores import check_logits, log_prob_true
from crl.attacks.signals import Signals
from crl.core.errors import CRLError
from crl.core.registry import ATTACKS


def stable_log_probs(logits) -> tuple[np.ndarray, np.ndarray]:
    """(log p_i, log(1 - p_i)) for every class, float64, accurate for huge margins.

    The log-partition is z_max + log1p(sum_{i != argmax} exp(z_i - z_max)), so the top class's
    log-probability keeps the tiny mass of the others instead of rounding to 0.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise CRLError(f"logits must be [samples, classes>=2], got shape {list(z.shape)}")
    top = z.argmax(1)
    rows = np.arange(z.shape[0])
    shifted = z - z[rows, top][:, None]
    e = np.exp(shifted)
    e[rows, top] = 0.0
    rest = e.sum(1)                                 # sum of the non-top classes' exp(z - z_max)
    log_p = shifted - np.log1p(rest)[:, None]
    p = np.exp(log_p)
    with np.errstate(divide="ignore"):   # only the top class can have p == 1; fixed below
        log_1mp = np.log1p(-p)
    # 1 - p_top = rest / (1 + rest): exact in log space even when p_top rounds to 1.
    log_1mp[rows, top] = np.log(np.maximum(rest, 1e-320)) - np.log1p(rest)
    return log_p, log_1mp


def loss_score(logits, labels) -> np.ndarray:
    """Negative cross-entropy, log p_y (Yeom et al.): members have lower loss."""
    return log_prob_true(logits, labels)


def confidence_score(logits, labels=None) -> np.ndarray:
    """Log of the top softmax probability (Salem et al.): members are predicted confidently."""
    log_p, _ = stable_log_probs(logits)
    return log_p.max(1)


def entropy_score(logits, labels=None) -> np.ndarray:
    """Negative prediction entropy: members have peaked posteriors."""
    log_p, _ = stable_log_probs(logits)
    return (np.exp(log_p) * log_p).sum(1)


def _mentr_from_logs(log_p: np.ndarray, log_1mp: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.arange(len(y))
    p, one_minus_p = np.exp(log_p), np.exp(log_1mp)
    other = -(p * log_1mp)
    other[rows, y] = 0.0
    return -one_minus_p[rows, y] * log_p[rows, y] + other.sum(1)


def modified_entropy(probs, labels) -> np.ndarray:
    """Song & Mittal's Mentr = -(1-p_y) log p_y - sum_{i!=y} p_i log(1-p_i), per sample.

    Members tend to score LOWER. `probs` are softmax probabilities [N, C].
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise CRLError(f"probs must be [samples, classes], got shape {list(p.shape)}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise CRLError("probs must be finite, non-negative rows that sum to 1")
    _, y = check_logits(p, labels)
    tiny = np.finfo(np.float64).tiny
    return _mentr_from_logs(np.log(np.maximum(p, tiny)), np.log(np.maximum(1.0 - p, tiny)), y)


def mentr_score(logits, labels) -> np.ndarray:
    """Negative modified entropy from the logits (float64, log space)."""
    _, y = check_logits(logits, labels)
    log_p, log_1mp = stable_log_probs(logits)
    return -_mentr_from_logs(log_p, log_1mp, y)


SCORE_FUNCTIONS = {
    "loss": loss_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "mentr": mentr_score,
}


def _check_labelled(scores, is_member, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    m = np.asarray(is_member).astype(bool).ravel()
    y = np.asarray(labels).astype(np.int64).ravel()
    if not s.shape == m.shape == y.shape:
        raise CRLError(f"scores, is_member and labels differ in length: {s.shape[0]}, "
                       f"{m.shape[0]} and {y.shape[0]}")
    if m.all() or not m.any():
        raise CRLError("per-class thresholds need both members and non-members")
    if not np.isfinite(s).all():
        raise CRLError(f"{int((~np.isfinite(s)).sum())} membership scores are NaN or infinite")
    return s, m, y


def _best_threshold(s: np.ndarray, m: np.ndarray) -> float:
    fpr, tpr, thr = roc_curve(m, s, drop_intermediate=False)
    i = int(np.argmax(tpr + 1.0 - fpr))
    return float(min(thr[i], np.finfo(np.float64).max))


def fit_per_class_thresholds(scores, is_member, labels, num_classes: int) -> np.ndarray:
    """Per-class thresholds maximising balanced accuracy on (shadow) scores; member iff s >= t.

    A class with no members or no non-members gets the global best threshold.
    """
    s, m, y = _check_labelled(scores, is_member, labels)
    out = np.full(num_classes, _best_threshold(s, m))
    for c in range(num_classes):
        sel = y == c
        if m[sel].any() and (~m[sel]).any():
            out[c] = _best_threshold(s[sel], m[sel])
    return out


def _pooled(signals: Signals, score_of_model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, membership and labels of all models of `signals`, stacked."""
    scores = np.concatenate([score_of_model(k) for k in range(signals.num_models)])
    member = signals.member.reshape(-1)
    labels = np.tile(signals.labels, signals.num_models)
    return scores, member, labels


class ThresholdAttack(Attack):
    """Score = a function of the target's own output; per-class thresholds fitted on shadows.

    With shadows, `per_class_thresholds` holds the rule "member iff score >= t[label]" fitted
    on them; the caller scores it on the target (crl.attacks.metrics.thresholded_balanced_accuracy:
    the paper's accuracy protocol, reported as shadow_threshold_accuracy)."""

    score_name: ClassVar[str] = ""
    #: whether scores of every model of ctx.target are cheap enough to pool (leave-one-out)
    pool_all_models: ClassVar[bool] = True

    def optional_inputs(self) -> frozenset[str]:
        return frozenset({"shadows"})   # per-class thresholds for the paper's accuracy figure

    def target_scores(self, ctx: AttackContext, model: int) -> np.ndarray:
        return SCORE_FUNCTIONS[self.score_name](ctx.target.logits[model], ctx.target.labels)

    def shadow_scores(self, ctx: AttackContext, model: int) -> np.ndarray:
        assert ctx.shadow is not None
        return SCORE_FUNCTIONS[self.score_name](ctx.shadow.logits[model], ctx.shadow.labels)

    def run(self, ctx: AttackContext) -> AttackResult:
        scores = self.target_scores(ctx, 0)
        result = AttackResult(scores=scores)
        if self.pool_all_models and ctx.target.num_models > 1:
            # every reference model as the target too, with ONE global threshold: the
            # baseline LiRA/RMIA's leave-one-out rows are compared against at low FPR.
            result.loo_scores = np.stack([scores] + [self.target_scores(ctx, k)
                                                     for k in range(1, ctx.target.num_models)])
        if ctx.shadow is not None:
            s, m, y = _pooled(ctx.shadow, lambda k: self.shadow_scores(ctx, k))
            result.per_class_thresholds = fit_per_class_thresholds(s, m, y, ctx.num_classes)
        return result


THRESHOLD_DESCRIPTIONS = {
    "loss": "loss threshold on log p_y (Yeom et al., CSF 2018)",
    "confidence": "threshold on the top posterior probability (Salem et al., NDSS 2019)",
    "entropy": "threshold on the posterior entropy (Salem et al., NDSS 2019)",
    "mentr": "threshold on the modified entropy (Song & Mittal, USENIX Security 2021)",
}


def _register_threshold(name: str, doc: str) -> None:
    cls = type(f"{name.capitalize()}Attack", (ThresholdAttack,),
               {"score_name": name, "__doc__": doc,
                "description": THRESHOLD_DESCRIPTIONS.get(name, "")})
    ATTACKS.register(name)(cls)


for _name, _fn in SCORE_FUNCTIONS.items():
    _register_threshold(_name, _fn.__doc__ or _name)


@ATTACKS.register("gradx")
class GradXAttack(ThresholdAttack):
    """Negative L2 norm of the input gradient of the cross-entropy (members: flatter loss).

    Needs the target's gradient norms (ctx.gradient_scores(0)); with shadows and their gradient
    norms (ctx.shadow_gradient_scores) it also fits per-class thresholds like the others."""

    description: ClassVar[str] = ("Grad-x l2: threshold on the input-gradient norm, white-box "
                                  "(Rezaei & Liu, CVPR 2021)")

    pool_all_models = False   # one backward pass per sample per model: target only

    def requirements(self) -> frozenset[str]:
        return frozenset({"input_gradients"})

    def target_scores(self, ctx: AttackContext, model: int) -> np.ndarray:
        if ctx.gradient_scores is None:
            raise CRLError("attack 'gradx' needs input-gradient norms of the target "
                           "(ctx.gradient_scores is None)")
        return -np.asarray(ctx.gradient_scores(model), dtype=np.float64)

    def shadow_scores(self, ctx: AttackContext, model: int) -> np.ndarray:
        assert ctx.shadow_gradient_scores is not None
        return -np.asarray(ctx.shadow_gradient_scores(model), dtype=np.float64)

    def run(self, ctx: AttackContext) -> AttackResult:
        if ctx.shadow is not None and ctx.shadow_gradient_scores is None:
            ctx = dataclasses.replace(ctx, shadow=None)
        return super().run(ctx)

