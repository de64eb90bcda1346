"""LiRA: the likelihood-ratio attack of Carlini et al. 2022 ("Membership Inference Attacks From
First Principles", IEEE S&P).

Setting: one Signals pool on which every model trained on a random half, so that each sample has
models that trained on it (IN) and models that did not (OUT). For a target model t the reference
models are all the other models (leave-one-out); model t's own membership is never used.

Statistic: the logit-scaled confidence of the true label, phi = log p_y - log(1 - p_y), computed
exactly from the logits (crl.attacks.scores.logit_confidence). With flip augmentation the model
is queried on the image and on its mirror image: two statistics per sample.

Scores (higher = member), per sample, from that sample's reference models:
- online:  log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2).
- offline: the paper's one-sided test Lambda = Pr[Z <= phi], Z ~ N(mu_out, s_out^2), returned as
  logit(Lambda) = log Phi(z) - log Phi(-z) with z = (phi - mu_out) / s_out. This is a strictly
  increasing function of Lambda (same ranking, same ROC) that, unlike Lambda or log Lambda,
  stays finite and distinct in both tails (|z| of 40 and more), so it does not create ties.
- with flip: the mean over the two queries of the per-query score. For the online test this is
  (half of) the log-likelihood ratio of a 2-d Gaussian with diagonal covariance; each query has
  its own means and variances.

Variances: per sample and group, the unbiased (ddof=1) sample variance over that sample's IN
(resp. OUT) reference models, so per-sample variance needs >= 2 of each. fixed_variance=True uses
one global variance for IN and one for OUT (per query): the pooled within-sample variance,
sum over samples of squared deviations from that sample's own group mean divided by
sum over samples of (count - 1). When no sample has 2 models in the group (so the pooled estimate
has no degrees of freedom), the variance of all the group's statistics across samples is used
instead (larger: it includes between-sample spread); `extra['variance']` says which one ran.
Every variance is floored at VAR_FLOOR so that identical reference statistics give finite scores.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.special import log_ndtr

from crl.attacks.base import Attack, AttackContext, AttackResult, leave_one_out
from crl.attacks.scores import logit_confidence
from crl.attacks.signals import Signals
from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import ATTACKS

VAR_FLOOR = 1e-8


def lira_statistic(signals: Signals, use_flip: bool = False) -> np.ndarray:
    """Logit-scaled true-label confidence [models, samples, queries] float64; Q = 1 or 2."""
    if not isinstance(signals, Signals):
        raise CRLError(f"LiRA needs a Signals object, got {type(signals).__name__}")
    stats = [logit_confidence(signals.logits, signals.labels)]
    if use_flip:
        if signals.logits_flip is None:
            raise CRLError("LiRA flip=True needs logits on flipped inputs, "
                           "but signals.logits_flip is None")
        stats.append(logit_confidence(signals.logits_flip, signals.labels))
    return np.stack(stats, axis=-1)


def _check_target(target, num_models: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise CRLError(f"target model must be an integer index, got {target!r}")
    if not 0 <= int(target) < num_models:
        raise CRLError(f"target model {target} out of range; expected 0..{num_models - 1}")
    return int(target)


def _check_counts(n_in: np.ndarray, n_out: np.ndarray, need_in: int, need_out: int, *,
                  what: str, target: int, num_refs: int, sample_idx: np.ndarray) -> None:
    bad = (n_in < need_in) | (n_out < need_out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = (f">= {need_in} IN and >= {need_out} OUT" if need_in else f">= {need_out} OUT")
        raise CRLError(
            f"{what} needs {need} reference models per sample; sample {i} (dataset index "
            f"{int(sample_idx[i])}) has {int(n_in[i])} IN and {int(n_out[i])} OUT among the "
            f"{num_refs} models other than target {target} ({int(bad.sum())} samples fall short)")


def _group_fit(stat: np.ndarray, mask: np.ndarray,
               fixed_variance: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Per-sample means [N, Q] and variances ([N, Q] or [1, Q]) of the masked reference stats."""
    w = mask[:, :, None].astype(np.float64)                 # [R, N, 1]
    n = w.sum(0)                                            # [N, 1], >= 1 checked by the caller
    mu = (w * stat).sum(0) / n
    dev2 = w * (stat - mu[None]) ** 2                       # [R, N, Q]
    if not fixed_variance:
        var = dev2.sum(0) / (n - 1.0)                       # ddof=1; n >= 2 checked by the caller
        how = "per-sample"
    else:
        dof = float((n - 1.0).sum())
        if dof > 0:
            var = dev2.sum((0, 1))[None] / dof
            how = "pooled"
        else:
            var = stat[mask].var(0)[None]                   # [1, Q]
            how = "total"
    return mu, np.maximum(var, VAR_FLOOR), how


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2.0 * np.pi * var) + (x - mu) ** 2 / var)


def _lira_from_stat(stat: np.ndarray, member: np.ndarray, target: int, *, online: bool,
                    fixed_variance: bool, sample_idx: np.ndarray,
                    held_out: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Scores of model `target`; a reference model's held-out samples (held_out [M, N]) are
    neither IN nor OUT in its fits."""
    m = stat.shape[0]
    refs = np.array([i for i in range(m) if i != target], dtype=np.int64)
    ref_stat, ref_in = stat[refs], member[refs]
    ref_out = ~ref_in if held_out is None else ~ref_in & ~held_out[refs]
    n_in, n_out = ref_in.sum(0), ref_out.sum(0)
    need = 1 if fixed_variance else 2
    what = (f"LiRA {'online' if online else 'offline'} with "
            f"{'fixed' if fixed_variance else 'per-sample'} variance")
    _check_counts(n_in, n_out, need if online else 0, need, what=what, target=target,
                  num_refs=len(refs), sample_idx=sample_idx)
    s = stat[target]                                        # [N, Q]
    mu_out, var_out, how = _group_fit(ref_stat, ref_out, fixed_variance)
    if online:
        mu_in, var_in, how_in = _group_fit(ref_stat, ref_in, fixed_variance)
        per_query = _gauss_logpdf(s, mu_in, var_in) - _gauss_logpdf(s, mu_out, var_out)
        if how_in != how:
            how = f"in: {how_in}, out: {how}"
    else:
        z = (s - mu_out) / np.sqrt(var_out)
        per_query = log_ndtr(z) - log_ndtr(-z)              # logit of Pr[Z <= phi]
    return per_query.mean(-1), how


def lira_scores(signals: Signals, target: int, *, online: bool = True, fixed_variance: bool = False,
                use_flip: bool = False) -> np.ndarray:
    """LiRA membership scores [N] (float64, higher = member) of model `target`.

    References: every other model of `signals`. See the module docstring for the tests.
    """
    stat = lira_statistic(signals, use_flip)
    t = _check_target(target, signals.num_models)
    return _lira_from_stat(stat, signals.member, t, online=online, fixed_variance=fixed_variance,
                           sample_idx=signals.sample_idx, held_out=signals.held_out)[0]


def lira_loo(signals: Signals, *, online: bool = True, fixed_variance: bool = False,
             use_flip: bool = False) -> np.ndarray:
    """Leave-one-out LiRA scores [M, N]: row t scores model t against all the other models."""
    stat = lira_statistic(signals, use_flip)
    return np.stack([
        _lira_from_stat(stat, signals.member, t, online=online, fixed_variance=fixed_variance,
                        sample_idx=signals.sample_idx, held_out=signals.held_out)[0]
        for t in range(signals.num_models)])


LIRA_SPEC = ParamSpec(
    Param("fixed_variance", False, bool,
          help="one pooled variance per group instead of per-sample variances (few references)"),
    Param("flip", False, bool, help="also query every model on horizontally flipped inputs"),
)


class _LiRABase(Attack):
    """Registered LiRA. Scores of model 0 against models 1..M-1; loo_scores for every model."""

    online: ClassVar[bool] = True
    spec = LIRA_SPEC

    def requirements(self) -> frozenset[str]:
        return frozenset({"references", "flip"} if self.params["flip"] else {"references"})

    @property
    def min_references(self) -> int:
        # Reference models needed when each sample is IN for half of them: enough for
        # 2 IN and 2 OUT per sample (1 and 1 with a fixed variance).
        return 2 if self.params["fixed_variance"] else 4

    @property
    def per_sample_references(self) -> tuple[int, int]:
        need = 1 if self.params["fixed_variance"] else 2
        return (need if self.online else 0), need

    def run(self, ctx: AttackContext) -> AttackResult:
        sig = ctx.target
        if not isinstance(sig, Signals):
            raise CRLError(f"attack '{self.name}' needs target Signals, got {type(sig).__name__}")
        if sig.num_models < 2:
            raise CRLError(f"attack '{self.name}' needs reference models; the target signals hold "
                           f"{sig.num_models} model(s), expected >= {self.min_references + 1}")
        fixed, flip = self.params["fixed_variance"], self.params["flip"]
        stat = lira_statistic(sig, flip)
        kw = dict(online=self.online, fixed_variance=fixed, sample_idx=sig.sample_idx,
                  held_out=sig.held_out)
        scores, how = _lira_from_stat(stat, sig.member, 0, **kw)
        extra = {"online": self.online, "fixed_variance": fixed, "flip": flip, "variance": how,
                 "num_references": sig.num_models - 1}
        loo = leave_one_out(lambda t: _lira_from_stat(stat, sig.member, t, **kw)[0],
                            sig.num_models, scores, extra)
        return AttackResult(scores=scores, extra=extra, loo_scores=loo)


@ATTACKS.register("lira")
class LiRAOnline(_LiRABase):
    """LiRA online: Gaussian likelihood ratio of IN vs OUT reference statistics."""

    description: ClassVar[str] = ("LiRA online: per-sample Gaussian likelihood ratio, IN and "
                                  "OUT references (Carlini et al., S&P 2022)")

    online = True


@ATTACKS.register("lira_offline")
class LiRAOffline(_LiRABase):
    """LiRA offline: one-sided test against the OUT reference statistics only."""

    description: ClassVar[str] = ("LiRA offline: one-sided test against OUT references only "
                                  "(Carlini et al., S&P 2022)")

    online = False
