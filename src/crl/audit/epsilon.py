"""Empirical epsilon lower bounds: what an attack's success proves about a training run's DP.

One run (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy Auditing with One (1) Training
Run", arXiv:2305.08846v1; Algorithm 1): m canaries, each included in training independently
with probability 1/2; the auditor guesses "in" on the k+ highest-scoring canaries, "out" on the
k- lowest and abstains on the rest (r = k+ + k- guesses, W of them correct). The paper's main
result (Theorem 5.2) in the form it states for guesses in {-1, 0, +1} with at most r
non-abstentions (Corollary 5.4, "ternary guesses", the form the paper uses for all its
experiments): if training is (eps, delta)-DP in the canaries' inclusion, then for every v

    P[W >= v] <= f(v) + 2 m delta max_{i = 1..m} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, q) >= u],   q = e^eps / (e^eps + 1).

For delta = 0 this is W stochastically dominated by Binomial(r, q). For i >= v, f(v - i) = 1,
so the terms with i > v are smaller than the one at i = v: the maximum is taken over
i = 1..v, f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v]. From the p-value to a bound (the
paper's Section 4.3, Lemma 4.7): the lower bound at confidence 1 - beta is the largest eps whose
hypothesis "(eps, delta)-DP" the observed v rejects at level beta (found by bisection: the
right-hand side grows with eps). Source of the statement: the paper's text as transcribed from
the arXiv PDF in a public repository's research notes (theorem numbers, pages and the paper's
printed values); crl reproduces the paper's printed values (Appendix D, Section 7) to their
last digit (tests/test_privacy_audit.py). Its ceiling is the same bound for the most correct
guesses any attack could make on these canaries (v = min(k+, included) + min(k-, excluded)): a
perfect attack reaches it, and with few canaries the ceiling, not the model, limits the bound.
Several (k+, k-) choices are tried (at most 10), each at level beta / (number tried), and the
largest bound is reported: a union (Bonferroni) bound over the choices, valid whatever the
scores (the paper notes that keeping the best of several k without such a correction lowers the
confidence).

Many runs (Jagielski et al. 2020; Nasr et al. 2021): the two-point bound from the false
positive and false negative rates of a threshold fitted on separate models, with one-sided
Clopper-Pearson upper bounds (each at beta / 2):

    eps >= max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi)).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from crl.core.errors import CRLError

#: What the number is, written beside it in results.json and the report.
ONE_RUN_MEANING = ("a lower bound at {level:g}% that holds for the randomised canaries of this "
                   "audit (Steinke et al. 2023)")
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
MAX_CANDIDATES = 10
EPS_MAX = 60.0


def _check_level(delta: float, confidence: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise CRLError(f"delta = {delta}: expected a number in [0, 1)")
    if not 0.0 < confidence < 1.0:
        raise CRLError(f"confidence = {confidence}: expected a number in (0, 1)")


def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The bound on P[W >= v] above (Corollary 5.4 of Theorem 5.2) for r guesses among m
    canaries under (eps, delta)-DP, capped at 1."""
    if not 0 <= v <= r <= m:
        raise CRLError(f"guesses: expected 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)   # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


@lru_cache(maxsize=65536)
def one_run_epsilon(m: int, r: int, v: int, *, delta: float = 1e-5,
                    beta: float = 0.05) -> float:
    """Largest eps (>= 0) that the observation (v correct of r guesses, m canaries) does not
    reject at level beta: the (1 - beta) lower bound on eps. 0 when eps = 0 is not rejected."""
    if one_run_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, EPS_MAX
    if one_run_p_value(m, r, v, hi, delta) <= beta:
        return hi
    for _ in range(40):   # bracket width 60 / 2^40: far below any reported digit
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(m: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """The (k+, k-) pairs tried: symmetric guesses on a fraction of the m canaries."""
    out: list[tuple[int, int]] = []
    for f in fractions:
        k = max(1, round(f * m / 2))
        pair = (min(k, m - m // 2), min(k, m // 2)) if f < 1.0 else (m - m // 2, m // 2)
        if pair not in out and sum(pair) > 0:
            out.append(pair)
    if len(out) > MAX_CANDIDATES:
        raise CRLError(f"guess counts = {len(out)} choices: expected at most {MAX_CANDIDATES}")
    return out


def correct_guesses(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int,
                    order: np.ndarray) -> int:
    """Correct guesses: "in" on the k+ highest scores, "out" on the k- lowest (`order` sorts
    the scores ascending, ties broken at random by the caller)."""
    low, high = order[:k_minus], order[len(order) - k_plus:] if k_plus else order[:0]
    return int(included[high].sum() + (~included[low]).sum())


def best_possible(included: np.ndarray, k_plus: int, k_minus: int) -> int:
    """The most correct guesses any attack can make with (k+, k-) on these canaries."""
    n_in = int(included.sum())
    return min(k_plus, n_in) + min(k_minus, len(included) - n_in)


def one_run_audit(scores, included, *, delta: float = 1e-5, confidence: float = 0.95,
                  guesses: Sequence[tuple[int, int]] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """The one-run epsilon lower bound from canary `scores` (higher = member) and `included`
    (each canary's independent inclusion bit). Tries every (k+, k-) of `guesses` (default
    `guess_counts`) at level (1 - confidence) / len(guesses) and reports the best."""
    _check_level(delta, confidence)
    s = np.asarray(scores, np.float64).ravel()
    inc = np.asarray(included).astype(bool).ravel()
    if np.isnan(s).any():   # unscored canaries (a sample budget): refused, not guessed on
        raise CRLError(f"{int(np.isnan(s).sum())} of {len(s)} canaries were not scored (an "
                       "attack on a sample budget, e.g. boundary.per_class): expected every "
                       "canary scored; set per_class=null or choose another --epsilon-attack")
    if s.shape != inc.shape or len(s) == 0 or not np.isfinite(s).all():
        raise CRLError(f"canary scores = {len(s)} values: expected one finite score per "
                       f"inclusion bit ({len(inc)})")
    m = len(s)
    pairs = list(guesses) if guesses is not None else guess_counts(m)
    if not 0 < len(pairs) <= MAX_CANDIDATES or any(a < 0 or b < 0 or a + b > m or a + b == 0
                                                   for a, b in pairs):
        raise CRLError(f"guesses = {pairs}: expected 1 to {MAX_CANDIDATES} pairs (k+, k-) "
                       f"with 0 < k+ + k- <= {m}")
    beta = (1.0 - confidence) / len(pairs)
    order = np.lexsort((np.random.default_rng(seed).random(m), s))
    rows = []
    for kp, km in pairs:
        v = correct_guesses(s, inc, kp, km, order)
        rows.append({"k_plus": kp, "k_minus": km, "correct": v,
                     "bound": one_run_epsilon(m, kp + km, v, delta=delta, beta=beta),
                     "ceiling": one_run_epsilon(m, kp + km, best_possible(inc, kp, km),
                                                delta=delta, beta=beta)})
    best = max(rows, key=lambda row: row["bound"])
    return {"epsilon_lower_bound": best["bound"], "ceiling": max(r["ceiling"] for r in rows),
            "k_plus": best["k_plus"], "k_minus": best["k_minus"], "correct": best["correct"],
            "guesses": best["k_plus"] + best["k_minus"], "canaries": m, "included": int(inc.sum()),
            "delta": delta, "confidence": confidence, "choices_tried": len(pairs),
            "what": ONE_RUN_MEANING.format(level=100 * confidence)}


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a rate with k events in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise CRLError(f"rate = {k}/{n}: expected 0 <= events <= trials, trials > 0")
    return 1.0 if k == n else float(stats.beta.ppf(1.0 - alpha, k + 1, n - k))


def two_point_epsilon(fpr: float, fnr: float, delta: float) -> float:
    """max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR)), at least 0."""
    best = 0.0
    for a, b in ((fnr, fpr), (fpr, fnr)):
        num = 1.0 - delta - a
        if num > 0:
            best = max(best, math.inf if b <= 0 else math.log(num / b))
    return best


def fit_threshold(scores: np.ndarray, member: np.ndarray, delta: float) -> float:
    """The threshold (member iff score >= t) maximising the two-point point estimate."""
    s, m = np.asarray(scores, np.float64).ravel(), np.asarray(member, bool).ravel()
    if m.all() or not m.any():
        raise CRLError("threshold fit: expected both members and non-members")
    candidates = np.unique(s)
    pos, neg = s[m], s[~m]
    fpr = (neg[None] >= candidates[:, None]).mean(1)
    fnr = (pos[None] < candidates[:, None]).mean(1)
    # empirical rates of 0 would give an infinite estimate: count half an event instead
    fpr = np.maximum(fpr, 0.5 / len(neg))
    fnr = np.maximum(fnr, 0.5 / len(pos))
    est = [two_point_epsilon(a, b, delta) for a, b in zip(fpr, fnr)]
    return float(candidates[int(np.argmax(est))])


def many_run_audit(fit_scores, fit_member, eval_scores, eval_member, *, delta: float = 1e-5,
                   confidence: float = 0.95) -> dict[str, Any]:
    """The two-point bound: threshold fitted on (fit_scores, fit_member) (separate models),
    FPR and FNR counted on the evaluation pairs with Clopper-Pearson upper bounds."""
    _check_level(delta, confidence)
    t = fit_threshold(fit_scores, fit_member, delta)
    s, m = np.asarray(eval_scores, np.float64).ravel(), np.asarray(eval_member, bool).ravel()
    if m.all() or not m.any():
        raise CRLError("two-point bound: expected both members and non-members to evaluate")
    alpha = (1.0 - confidence) / 2.0
    fp, fn = int((s[~m] >= t).sum()), int((s[m] < t).sum())
    fpr_hi = clopper_pearson_upper(fp, int((~m).sum()), alpha)
    fnr_hi = clopper_pearson_upper(fn, int(m.sum()), alpha)
    return {"epsilon_lower_bound": two_point_epsilon(fpr_hi, fnr_hi, delta),
            "threshold": t, "fpr": fp / int((~m).sum()), "fnr": fn / int(m.sum()),
            "fpr_upper": fpr_hi, "fnr_upper": fnr_hi, "pairs": len(s), "delta": delta,
            "confidence": confidence,
            "what": f"an empirical epsilon, not a certificate: the two-point bound at "
                    f"{100 * confidence:g}% over models with random membership (Jagielski et "
                    "al. 2020), threshold fitted on separate models, (model, sample) pairs "
                    "treated as independent trials"}


def claim_warning(bound: float, claimed_epsilon: float | None) -> str | None:
    """A loud warning (also issued through `warnings`) when the lower bound exceeds the
    accountant's epsilon: the DP implementation or the audit is wrong."""
    if claimed_epsilon is None or not bound > claimed_epsilon:
        return None
    text = (f"PRIVACY AUDIT FAILURE: the empirical epsilon lower bound {bound:.3g} exceeds the "
            f"accountant's epsilon {claimed_epsilon:.3g}; the DP implementation or the audit is "
            "wrong")
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


def epsilon_attack_name(chosen: str | None, attacks: Sequence[str]) -> str | None:
    """The attack behind an audit's epsilon bound: `chosen` (it must run), else lira when it
    runs, else loss when it runs, else None (no bound)."""
    if chosen is not None:
        if chosen not in attacks:
            raise CRLError(f"epsilon_attack = {chosen!r}: expected one of the attacks that run "
                           f"({', '.join(attacks)})")
        return chosen
    return next((a for a in ("lira", "loss") if a in attacks), None)


def canary_epsilon(name: str, target_scores, included, pooled=None, pooled_member=None, *,
                   delta: float = 1e-5, claimed_epsilon: float | None = None,
                   seed: int = 0) -> dict[str, Any]:
    """The audit's epsilon entry for its canaries (results.json, report).

    one_run: `one_run_audit` on the target's canary scores and inclusion bits (row 0).
    many_runs: `many_run_audit` over the reference models (rows 1.. of `pooled` and
    `pooled_member`, every model as the target): threshold fitted on the first half of them,
    rates counted on the second half (None with fewer than 2 references).
    accountant_epsilon: `claimed_epsilon` (DP-SGD's); `warning` when a bound exceeds it."""
    out: dict[str, Any] = {"attack": name, "delta": delta, "one_run": None, "many_runs": None,
                           "accountant_epsilon": claimed_epsilon, "warning": None}
    try:   # e.g. an attack that gave some canary a NaN score: say so, keep the audit
        out["one_run"] = one_run_audit(target_scores, included, delta=delta, seed=seed)
    except CRLError as e:
        out["one_run"] = {"skipped": str(e)}
    if pooled is not None and pooled_member is not None and len(pooled) >= 3:
        s, m = np.asarray(pooled)[1:], np.asarray(pooled_member, bool)[1:]
        h = len(s) // 2
        try:
            out["many_runs"] = {**many_run_audit(s[:h], m[:h], s[h:], m[h:], delta=delta),
                                "fit_models": h, "eval_models": len(s) - h}
        except CRLError as e:
            out["many_runs"] = {"skipped": str(e)}
    bounds = [part["epsilon_lower_bound"] for part in (out["one_run"], out["many_runs"])
              if part and "epsilon_lower_bound" in part]
    out["warning"] = claim_warning(max(bounds), claimed_epsilon) if bounds else None
    return out
