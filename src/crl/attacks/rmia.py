"""RMIA: Zarifzadeh et al. 2024 (ICML), "Low-Cost High-Power Membership Inference Attacks".

For a target model theta and a sample x with label y:
    LR(x) = p(y | x, theta) / p(x),    p(x) = mean over reference models of p(y | x, theta_ref)
    Score(x) = fraction of population samples z with LR(x) / LR(z) > gamma
Population z: samples that none of the models trained on (`ctx.population`), scored by the same
models, their p(z) computed with the same formula.

Offline (default): the references of x are OUT models only, and p(x) is the paper's linear
approximation of the mean over IN and OUT models,
    p(x) = ((1 + a) / 2) * mean_OUT p(y | x, theta_ref) + (1 - a) / 2.
`a` defaults to 0.3; the paper tunes it per dataset on reference models (the value matters for
the offline attack; a = 1 means "use the OUT mean as is"). Online: p(x) is the mean over
reference models half IN and half OUT for x (no `a`).
gamma defaults to 2.0; the paper uses gamma between 1 and 2.

Reference choice (deterministic and documented, so results are reproducible): for target model t
the other models are ordered cyclically t+1, t+2, ..., M-1, 0, ..., t-1. Offline, each sample x
uses the first `num_refs` models in that order that did NOT train on x (so every sample gets
exactly num_refs OUT references, possibly different models for different samples). Online, x
uses the first floor(num_refs/2) models in that order that trained on x and the first
num_refs - floor(num_refs/2) that did not. A population sample z is OUT for every model, so it
uses the first `num_refs` models in the order (the same rule: the first OUT ones). A sample
without enough such models is an error, not a silent fallback.

All probabilities are handled as log-probabilities in float64 (crl.attacks.scores), and the
pairwise comparison is done by sorting the population's log LR once and binary-searching each
log LR(x) - log gamma: O((N + Z) log Z) time and O(N + Z) memory, never an N x Z matrix.
"""
from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
from scipy.special import logsumexp

from crl.attacks.base import Attack, AttackContext, AttackResult, leave_one_out
from crl.attacks.scores import log_prob_true
from crl.attacks.signals import Signals
from crl.errors import CRLError
from crl.params import Param, ParamSpec
from crl.registry import ATTACKS


def _cyclic_others(num_models: int, target: int) -> np.ndarray:
    return np.array([(target + j) % num_models for j in range(1, num_models)], dtype=np.int64)


def _first_k(mask: np.ndarray, k: int) -> np.ndarray:
    """Along axis 0 (the ordered models), keep the first k True entries of each column."""
    return mask & (np.cumsum(mask, axis=0) <= k)


RMIA_SPEC = ParamSpec(
    Param("num_refs", 4, int, low=1, help="reference models per sample"),
    Param("a", 0.3, float, low=0.0, high=1.0,
          help="offline: p(x) = (1+a)/2 mean_OUT p + (1-a)/2 (tuned per dataset in the paper)"),
    Param("gamma", 2.0, float, low=0.0, low_open=True,
          help="LR(x)/LR(z) must exceed gamma for z to count"),
    Param("offline", True, bool, help="OUT references only (else half IN, half OUT)"),
)


def _check_population(signals: Signals, population: Signals) -> None:
    if not isinstance(signals, Signals) or not isinstance(population, Signals):
        raise CRLError("RMIA needs Signals for both the target pool and the population, got "
                       f"{type(signals).__name__} and {type(population).__name__}")
    if population.num_models != signals.num_models:
        raise CRLError(f"population signals hold {population.num_models} models, expected "
                       f"{signals.num_models} (the same models as the target signals)")
    if population.logits.shape[2] != signals.logits.shape[2]:
        raise CRLError(f"population logits have {population.logits.shape[2]} classes, expected "
                       f"{signals.logits.shape[2]} like the target signals")
    if population.logits.shape[1] == 0:
        raise CRLError("population signals hold 0 samples; RMIA needs >= 1 population sample")
    if population.member.any():
        m, z = np.argwhere(population.member)[0]
        raise CRLError(f"population sample {z} (dataset index {population.sample_idx[z]}) is a "
                       f"training member of model {m}; expected samples no model trained on")


def _log_ref_prob(logp_refs: np.ndarray, sel: np.ndarray, k: int, offline: bool,
                  a: float) -> np.ndarray:
    """log p(x) from the selected references' log p(y|x) [R, N] (sel: exactly k per column)."""
    log_mean = logsumexp(np.where(sel, logp_refs, -np.inf), axis=0) - math.log(k)
    if not offline:
        return log_mean
    if a >= 1.0:
        return log_mean
    return np.logaddexp(math.log((1.0 + a) / 2.0) + log_mean, math.log((1.0 - a) / 2.0))


def _rmia_one(logp: np.ndarray, member: np.ndarray, logp_pop: np.ndarray, target: int, *,
              num_refs: int, a: float, gamma: float, offline: bool,
              sample_idx: np.ndarray) -> np.ndarray:
    m = logp.shape[0]
    if num_refs > m - 1:
        raise CRLError(f"RMIA num_refs={num_refs} but only {m - 1} reference models exist besides "
                       f"target {target}; expected num_refs in 1..{m - 1}")
    order = _cyclic_others(m, target)
    ref_in = member[order]                                  # [R, N]
    if offline:
        sel = _first_k(~ref_in, num_refs)
        need_in, need_out = 0, num_refs
    else:
        need_in = num_refs // 2
        need_out = num_refs - need_in
        sel = _first_k(ref_in, need_in) | _first_k(~ref_in, need_out)
    n_in, n_out = ref_in.sum(0), (~ref_in).sum(0)
    bad = (n_in < need_in) | (n_out < need_out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = f"{need_in} IN and {need_out} OUT" if need_in else f"{need_out} OUT"
        raise CRLError(
            f"RMIA {'offline' if offline else 'online'} with num_refs={num_refs} needs {need} "
            f"reference models per sample; sample {i} (dataset index {int(sample_idx[i])}) has "
            f"{int(n_in[i])} IN and {int(n_out[i])} OUT among the {m - 1} models other than "
            f"target {target} ({int(bad.sum())} samples fall short)")
    log_px = _log_ref_prob(logp[order], sel, num_refs, offline, a)
    pop_sel = np.zeros((m - 1, logp_pop.shape[1]), dtype=bool)
    pop_sel[:num_refs] = True                               # all OUT: the first num_refs in order
    log_pz = _log_ref_prob(logp_pop[order], pop_sel, num_refs, offline, a)
    log_lr_x = logp[target] - log_px
    log_lr_z = np.sort(logp_pop[target] - log_pz)
    # LR(x)/LR(z) > gamma  <=>  log LR(z) < log LR(x) - log gamma: count of z strictly below.
    below = np.searchsorted(log_lr_z, log_lr_x - math.log(gamma), side="left")
    return below / float(log_lr_z.shape[0])


def _log_probs(signals: Signals, population: Signals) -> tuple[np.ndarray, np.ndarray]:
    _check_population(signals, population)
    return (log_prob_true(signals.logits, signals.labels),
            log_prob_true(population.logits, population.labels))


def rmia_scores(signals: Signals, population: Signals, target: int, **params) -> np.ndarray:
    """RMIA scores [N] in [0, 1] (higher = member) of model `target` (see the module docstring).

    `params`: num_refs, a, gamma, offline (RMIA_SPEC; defaults 4, 0.3, 2.0, True).
    """
    p = RMIA_SPEC.resolve("rmia", params)
    logp, logp_pop = _log_probs(signals, population)
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) \
            or not 0 <= int(target) < signals.num_models:
        raise CRLError(f"target model {target!r} out of range; "
                       f"expected 0..{signals.num_models - 1}")
    return _rmia_one(logp, signals.member, logp_pop, int(target), sample_idx=signals.sample_idx,
                     **p)


def rmia_loo(signals: Signals, population: Signals, **params) -> np.ndarray:
    """Leave-one-out RMIA scores [M, N]: row t scores model t with references from the others."""
    p = RMIA_SPEC.resolve("rmia", params)
    logp, logp_pop = _log_probs(signals, population)
    return np.stack([_rmia_one(logp, signals.member, logp_pop, t, sample_idx=signals.sample_idx,
                               **p)
                     for t in range(signals.num_models)])


@ATTACKS.register("rmia")
class RMIAAttack(Attack):
    """RMIA (offline by default). Scores of model 0; loo_scores for every model when possible."""

    description: ClassVar[str] = ("RMIA: likelihood ratio against population samples, reference "
                                  "models (Zarifzadeh et al., ICML 2024)")

    spec = RMIA_SPEC

    def requirements(self) -> frozenset[str]:
        return frozenset({"references", "population"})

    @property
    def min_references(self) -> int:
        # Reference models needed when each sample is IN for half of them.
        k = self.params["num_refs"]
        return 2 * k if self.params["offline"] else 2 * (k - k // 2)

    def run(self, ctx: AttackContext) -> AttackResult:
        if ctx.population is None:
            raise CRLError("attack 'rmia' needs population signals (ctx.population is None)")
        sig, pop = ctx.target, ctx.population
        logp, logp_pop = _log_probs(sig, pop)
        p = self.params
        scores = _rmia_one(logp, sig.member, logp_pop, 0, sample_idx=sig.sample_idx, **p)
        extra = {"offline": p["offline"], "num_refs": p["num_refs"],
                 "a": p["a"] if p["offline"] else None, "gamma": p["gamma"],
                 "population_size": int(pop.logits.shape[1]),
                 "reference_choice": (
                     "first num_refs OUT models in cyclic order after the target" if p["offline"]
                     else "first k//2 IN and k-k//2 OUT models in cyclic order after the target")}
        loo = leave_one_out(
            lambda t: _rmia_one(logp, sig.member, logp_pop, t, sample_idx=sig.sample_idx, **p),
            sig.num_models, scores, extra)
        return AttackResult(scores=scores, extra=extra, loo_scores=loo)
