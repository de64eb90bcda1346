"""RMIA: Zarifzadeh et al. 2024 (ICML), "Low-Cost High-Power Membership Inference Attacks".

For a target model theta and a sample x with label y:
    LR(x) = p(y | x, theta) / p(x),    p(x) = mean over reference models of p(y | x, theta_ref)
    Score(x) = fraction of population samples z with LR(x) / LR(z) > gamma
Population z: samples that none of the models trained on (`ctx.population`), scored by the same
models, their p(z) computed with the same formula. p(y | x, theta) is the softmax probability
of the true label at `temperature` (softmax(logits / temperature)_y).

Offline (default): the references of x are OUT models only, and p(x) is the paper's linear
approximation of the mean over IN and OUT models,
    p(x) = ((1 + a) / 2) * mean_OUT p(y | x, theta_ref) + (1 - a) / 2.
Online: p(x) is the mean over reference models half IN and half OUT for x (no `a`). "mean" is
the trimmed mean of the authors' code (scipy.stats.trim_mean: int(trim * k) of the k values cut
at each end; trim = 0 is the plain mean).

Defaults, from the authors' code for the paper (privacytrustlab/ml_privacy_meter, commit
d3273416, research/2024_rmia: README and attack_configs/*; see docs/attacks.md): gamma 2,
temperature 2, trim 0.2, every available reference model (num_refs = null), offline. `a` is
per dataset there (CIFAR-10 and CINIC-10 0.3, CIFAR-100 0.6, Purchase-100 0.2); crl's datasets
have no published value, so `a = null` (default) chooses it by the authors' procedure
(`tune_offline_a` in the same repository): one reference model plays the target, the other
references (never the audited target) attack it for a in 0.0, 0.1, ..., 1.0, and the a with
the highest AUC on that model's known membership is used (`extra['a']`, `extra['a_auc']`).

Reference choice (deterministic and documented, so results are reproducible): for target model t
the other models are ordered cyclically t+1, t+2, ..., M-1, 0, ..., t-1. Offline, each sample x
uses the first `num_refs` models in that order that did NOT train on x (so every sample gets
exactly num_refs OUT references, possibly different models for different samples). Online, x
uses the first floor(num_refs/2) models in that order that trained on x and the first
num_refs - floor(num_refs/2) that did not. A population sample z is OUT for every model, so it
uses the first `num_refs` models in the order (the same rule: the first OUT ones). num_refs =
null means as many as every sample has: offline the smallest OUT count over the samples, online
twice the smallest of the IN and OUT counts. A sample without enough such models is an error,
not a silent fallback.

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
from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import ATTACKS


def _cyclic_others(num_models: int, target: int) -> np.ndarray:
    return np.array([(target + j) % num_models for j in range(1, num_models)], dtype=np.int64)


def _first_k(mask: np.ndarray, k: int) -> np.ndarray:
    """Along axis 0 (the ordered models), keep the first k True entries of each column."""
    return mask & (np.cumsum(mask, axis=0) <= k)


RMIA_SPEC = ParamSpec(
    Param("num_refs", None, int, low=1, nullable=True,
          help="reference models per sample (null: all that every sample has)"),
    Param("a", None, float, low=0.0, high=1.0, nullable=True,
          help="offline: p(x) = (1+a)/2 mean_OUT p + (1-a)/2 (null: chosen on the reference "
               "models by the authors' procedure)"),
    Param("gamma", 2.0, float, low=0.0, low_open=True,
          help="LR(x)/LR(z) must exceed gamma for z to count"),
    Param("temperature", 2.0, float, low=0.0, low_open=True,
          help="p(y|x) = softmax(logits / temperature)_y"),
    Param("trim", 0.2, float, low=0.0, high=0.5, high_open=True,
          help="trimmed mean of the references' p: fraction cut at each end"),
    Param("offline", True, bool, help="OUT references only (else half IN, half OUT)"),
)

#: The grid of the authors' `tune_offline_a` (ml_privacy_meter, modules/mia/attacks/rmia.py).
A_GRID = tuple(round(0.1 * i, 1) for i in range(11))


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
                  a: float, trim: float = 0.0) -> np.ndarray:
    """log p(x) from the selected references' log p(y|x) [R, N] (sel: exactly k per column):
    the trimmed mean (scipy.stats.trim_mean's cut, int(trim * k) at each end) of the k values."""
    cut = int(trim * k)
    if cut == 0:
        log_mean = logsumexp(np.where(sel, logp_refs, -np.inf), axis=0) - math.log(k)
    else:   # the k selected values of each column, sorted (the others sort last as NaN)
        chosen = np.sort(np.where(sel, logp_refs, np.nan), axis=0)[cut:k - cut]
        log_mean = logsumexp(chosen, axis=0) - math.log(k - 2 * cut)
    if not offline or a >= 1.0:
        return log_mean
    return np.logaddexp(math.log((1.0 + a) / 2.0) + log_mean, math.log((1.0 - a) / 2.0))


def _refs_per_sample(ref_in: np.ndarray, ref_out: np.ndarray, num_refs: int | None,
                     offline: bool) -> int:
    """num_refs, or for null the most references every sample has (offline: OUT ones; online:
    as many IN as OUT); where some sample has none, the least that then fails with a reason.
    `ref_out` is not simply ~ref_in: a model's held-out samples are neither IN nor OUT."""
    if num_refs is not None:
        return num_refs
    r = ref_in.shape[0]
    n_in, n_out = ref_in.sum(0).min(initial=r), ref_out.sum(0).min(initial=r)
    if offline:
        return max(1, int(n_out))
    return max(2, 2 * int(min(n_in, n_out)))


def _check_num_refs(num_refs: int | None, m: int, target: int) -> None:
    if num_refs is not None and num_refs > m - 1:
        raise CRLError(f"RMIA num_refs={num_refs} but only {m - 1} reference models exist besides "
                       f"target {target}; expected num_refs in 1..{m - 1}")


def _rmia_one(logp: np.ndarray, member: np.ndarray, logp_pop: np.ndarray, target: int, *,
              num_refs: int | None, a: float, gamma: float, offline: bool,
              sample_idx: np.ndarray, trim: float = 0.0, temperature: float = 1.0,
              held_out: np.ndarray | None = None) -> np.ndarray:
    """Scores [N] of model `target`. `logp` [M, N] is log p(y|x) at the temperature already
    (`_log_probs`); `temperature` is accepted so that resolved params pass through as is.
    `held_out` [M, N]: samples a model's defense held out of its training, neither IN nor OUT."""
    m = logp.shape[0]
    _check_num_refs(num_refs, m, target)
    order = _cyclic_others(m, target)
    ref_in = member[order]                                  # [R, N]
    ref_out = ~ref_in if held_out is None else ~ref_in & ~held_out[order]   # held out: neither
    num_refs = _refs_per_sample(ref_in, ref_out, num_refs, offline)
    if offline:
        sel = _first_k(ref_out, num_refs)
        need_in, need_out = 0, num_refs
    else:
        need_in = num_refs // 2
        need_out = num_refs - need_in
        sel = _first_k(ref_in, need_in) | _first_k(ref_out, need_out)
    n_in, n_out = ref_in.sum(0), ref_out.sum(0)
    bad = (n_in < need_in) | (n_out < need_out)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        need = f"{need_in} IN and {need_out} OUT" if need_in else f"{need_out} OUT"
        raise CRLError(
            f"RMIA {'offline' if offline else 'online'} with num_refs={num_refs} needs {need} "
            f"reference models per sample; sample {i} (dataset index {int(sample_idx[i])}) has "
            f"{int(n_in[i])} IN and {int(n_out[i])} OUT among the {m - 1} models other than "
            f"target {target} ({int(bad.sum())} samples fall short)")
    log_px = _log_ref_prob(logp[order], sel, num_refs, offline, a, trim)
    pop_sel = np.zeros((m - 1, logp_pop.shape[1]), dtype=bool)
    pop_sel[:num_refs] = True                               # all OUT: the first num_refs in order
    log_pz = _log_ref_prob(logp_pop[order], pop_sel, num_refs, offline, a, trim)
    log_lr_x = logp[target] - log_px
    log_lr_z = np.sort(logp_pop[target] - log_pz)
    # LR(x)/LR(z) > gamma  <=>  log LR(z) < log LR(x) - log gamma: count of z strictly below.
    below = np.searchsorted(log_lr_z, log_lr_x - math.log(gamma), side="left")
    return below / float(log_lr_z.shape[0])


def _log_probs(signals: Signals, population: Signals,
               temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """log softmax(logits / temperature)_y of the pool and of the population, float64."""
    _check_population(signals, population)
    t = float(temperature)
    return (log_prob_true(np.asarray(signals.logits, np.float64) / t, signals.labels),
            log_prob_true(np.asarray(population.logits, np.float64) / t, population.labels))


def choose_a(logp: np.ndarray, member: np.ndarray, logp_pop: np.ndarray,
             sample_idx: np.ndarray, p: dict,
             held_out: np.ndarray | None = None) -> tuple[float, dict]:
    """The offline `a` by the authors' procedure (`tune_offline_a`): reference model 1 plays the
    target, models 2.. are its references (model 0, the audited target, is never used), and the
    a in A_GRID with the highest AUC on model 1's membership wins (the first on ties).
    Returns (a, {"a_auc": {a: AUC}, "a_chosen_on": "model 1 ..."})."""
    from crl.attacks.metrics import attack_metrics

    if logp.shape[0] < 3:
        raise CRLError(f"rmia.a = null chooses a on the reference models and needs >= 2 of them "
                       f"besides the target, got {logp.shape[0] - 1}; set rmia.a (e.g. 1.0)")
    truth = member[1]
    scored = np.ones_like(truth) if held_out is None else ~held_out[1]
    if truth[scored].all() or not truth[scored].any():
        raise CRLError("rmia.a = null: reference model 1 trained on all or none of the pool; "
                       "its AUC cannot choose a; set rmia.a")
    kw = {k: v for k, v in p.items() if k != "a"}
    aucs = {}
    for a in A_GRID:
        try:
            s = _rmia_one(logp[1:], member[1:], logp_pop[1:], 0, sample_idx=sample_idx,
                          a=a, held_out=None if held_out is None else held_out[1:], **kw)
        except CRLError as e:
            raise CRLError(f"rmia.a = null: choosing a on reference model 1 failed ({e}); "
                           "add reference models or set rmia.a") from None
        aucs[a] = float(attack_metrics(s[scored], truth[scored])["auc"])
    best = max(A_GRID, key=lambda a: (aucs[a], -a))
    return best, {"a_auc": aucs, "a_chosen_on": "reference model 1 as the target, models 2.. "
                  "as its references (the authors' tune_offline_a; grid 0.0..1.0 by 0.1)"}


def _resolved(params: dict, logp: np.ndarray, member: np.ndarray, logp_pop: np.ndarray,
              sample_idx: np.ndarray, held_out: np.ndarray | None = None) -> tuple[dict, dict]:
    """Params with `a` fixed (chosen when null and offline) and what the choice recorded."""
    p = dict(params)
    _check_num_refs(p["num_refs"], logp.shape[0], 0)
    if not p["offline"]:
        return p, {}
    if p["a"] is not None:
        return p, {"a_chosen_on": "set by the user"}
    p["a"], info = choose_a(logp, member, logp_pop, sample_idx, p, held_out)
    return p, info


def _target_arg(target, signals: Signals) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) \
            or not 0 <= int(target) < signals.num_models:
        raise CRLError(f"target model {target!r} out of range; "
                       f"expected 0..{signals.num_models - 1}")
    return int(target)


def rmia_scores(signals: Signals, population: Signals, target: int, **params) -> np.ndarray:
    """RMIA scores [N] in [0, 1] (higher = member) of model `target` (see the module docstring).

    `params`: RMIA_SPEC (num_refs, a, gamma, temperature, trim, offline); a = null is chosen
    on models 1.. by `choose_a` (so do not use it to score model 1 with a = null).
    """
    p = RMIA_SPEC.resolve("rmia", params)
    logp, logp_pop = _log_probs(signals, population, p["temperature"])
    t = _target_arg(target, signals)
    p, _ = _resolved(p, logp, signals.member, logp_pop, signals.sample_idx, signals.held_out)
    return _rmia_one(logp, signals.member, logp_pop, t, sample_idx=signals.sample_idx,
                     held_out=signals.held_out, **p)


def rmia_loo(signals: Signals, population: Signals, **params) -> np.ndarray:
    """Leave-one-out RMIA scores [M, N]: row t scores model t with references from the others
    (one `a` for every row, chosen as for model 0 when null)."""
    p = RMIA_SPEC.resolve("rmia", params)
    logp, logp_pop = _log_probs(signals, population, p["temperature"])
    p, _ = _resolved(p, logp, signals.member, logp_pop, signals.sample_idx, signals.held_out)
    return np.stack([_rmia_one(logp, signals.member, logp_pop, t, sample_idx=signals.sample_idx,
                               held_out=signals.held_out, **p)
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
        # Reference models needed when each sample is IN for half of them (complementary
        # pairs); choosing `a` (offline, a = null) takes one more pair: model 1 plays the target.
        k, offline = self.params["num_refs"], self.params["offline"]
        if k is None:
            k = 1 if offline else 2
        need = 2 * k if offline else 2 * (k - k // 2)
        return need + 2 if offline and self.params["a"] is None else need

    @property
    def per_sample_references(self) -> tuple[int, int]:
        # IN/OUT models each sample needs among the models other than the one scored; choosing
        # `a` (offline, a = null) scores reference model 1 with the others: one OUT model more.
        k, offline = self.params["num_refs"], self.params["offline"]
        if k is None:
            k = 1 if offline else 2
        if not offline:
            return (k // 2, k - k // 2)
        return (0, k + 1) if self.params["a"] is None else (0, k)

    def run(self, ctx: AttackContext) -> AttackResult:
        if ctx.population is None:
            raise CRLError("attack 'rmia' needs population signals (ctx.population is None)")
        sig, pop = ctx.target, ctx.population
        held = sig.held_out
        logp, logp_pop = _log_probs(sig, pop, self.params["temperature"])
        p, chosen = _resolved(self.params, logp, sig.member, logp_pop, sig.sample_idx, held)
        scores = _rmia_one(logp, sig.member, logp_pop, 0, sample_idx=sig.sample_idx,
                           held_out=held, **p)
        order = _cyclic_others(sig.num_models, 0)
        ref_out = ~sig.member[order] if held is None else ~sig.member[order] & ~held[order]
        extra = {"offline": p["offline"], "num_refs": _refs_per_sample(
                     sig.member[order], ref_out, p["num_refs"], p["offline"]),
                 "a": p["a"] if p["offline"] else None, "gamma": p["gamma"],
                 "temperature": p["temperature"], "trim": p["trim"], **chosen,
                 "population_size": int(pop.logits.shape[1]),
                 "reference_choice": (
                     "first num_refs OUT models in cyclic order after the target" if p["offline"]
                     else "first k//2 IN and k-k//2 OUT models in cyclic order after the target")}
        loo = leave_one_out(
            lambda t: _rmia_one(logp, sig.member, logp_pop, t, sample_idx=sig.sample_idx,
                                held_out=held, **p),
            sig.num_models, scores, extra)
        return AttackResult(scores=scores, extra=extra, loo_scores=loo)
