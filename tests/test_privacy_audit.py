"""Known-answer tests of the empirical epsilon lower bounds (crl.audit.epsilon)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import optimize, stats

from crl.audit.epsilon import (
    canary_epsilon,
    claim_warning,
    clopper_pearson_upper,
    epsilon_attack_name,
    many_run_audit,
    one_run_audit,
    one_run_epsilon,
    one_run_p_value,
    two_point_epsilon,
)
from crl.core.errors import CRLError

DELTA = 1e-5
DRAWS = 200


def randomised_response(eps: float, m: int, rng: np.random.Generator):
    """Each canary's inclusion bit, released truthfully with probability e^eps / (1 + e^eps):
    exactly (eps, 0)-DP in each bit."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < 1.0 / (1.0 + math.exp(-eps))
    return np.where(truthful, included, ~included).astype(float), included


def gaussian_eps(mu: float, delta: float) -> float:
    """The exact (eps, delta) curve of the Gaussian mechanism with sensitivity / sigma = mu
    (Balle & Wang 2018): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    def gap(eps):
        return (stats.norm.cdf(mu / 2 - eps / mu)
                - math.exp(eps) * stats.norm.cdf(-mu / 2 - eps / mu) - delta)
    return optimize.brentq(gap, 0.0, 100.0)


def gaussian_mechanism(mu: float, m: int, rng: np.random.Generator):
    included = rng.random(m) < 0.5
    return included * mu + rng.standard_normal(m), included


def bounds(mechanism, param, m: int) -> np.ndarray:
    out = []
    for seed in range(DRAWS):
        rng = np.random.default_rng(seed)
        scores, included = mechanism(param, m, rng)
        out.append(one_run_audit(scores, included, delta=DELTA, seed=seed)["epsilon_lower_bound"])
    return np.array(out)


@pytest.mark.parametrize("eps", [0.5, 2.0, 4.0])
def test_randomised_response_bound_holds(eps):
    b = bounds(randomised_response, eps, 1000)
    assert (b <= eps).mean() >= 0.92
    if eps == 2.0:
        assert np.median(b) >= eps / 2


@pytest.mark.parametrize("true_eps", [2.0, 10.0])
def test_gaussian_bound_holds(true_eps):
    mu = optimize.brentq(lambda x: gaussian_eps(x, DELTA) - true_eps, 0.01, 10.0)
    b = bounds(gaussian_mechanism, mu, 1000)
    assert (b <= true_eps).mean() >= 0.92
    # informative, though one run is far from tight for the Gaussian (median 0.63 at eps 2,
    # 3.1 at eps 10 when written): the half-epsilon median holds for randomised response only
    assert np.median(b) > 0.1 * true_eps


def test_perfect_attack_reaches_ceiling():
    rng = np.random.default_rng(0)
    included = rng.random(300) < 0.5
    out = one_run_audit(included.astype(float), included, delta=DELTA)
    assert out["epsilon_lower_bound"] == out["ceiling"] > 0
    assert out["correct"] == out["guesses"]


def test_ceiling_matches_closed_form_at_delta_zero():
    # v = r and delta = 0: q^r = beta, so eps = log(q / (1 - q)) with q = beta^(1/r)
    q = 0.05 ** (1 / 100)
    assert one_run_epsilon(100, 100, 100, delta=0.0, beta=0.05) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-9)


def test_p_value_is_the_binomial_tail_plus_delta_term():
    m, r, v, eps, delta = 50, 20, 15, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(stats.binom.pmf(j, r, q) for j in range(v, r + 1))
    alpha = max(sum(stats.binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i
                for i in range(1, v + 1))
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha)


def test_p_value_is_corollary_5_4_as_stated_with_i_up_to_m():
    """Steinke et al.'s Corollary 5.4 written as stated: f(v) + 2 m delta max over i = 1..m
    (not only 1..v) of (f(v - i) - f(v)) / i, f the Binomial(r, q) upper tail."""
    for m, r, v, eps, delta in [(50, 20, 15, 1.0, 1e-3), (200, 40, 7, 0.3, 1e-2),
                                (30, 30, 30, 2.0, 1e-4), (1000, 100, 75, 0.6, 1e-4)]:
        q = math.exp(eps) / (math.exp(eps) + 1)

        def f(u, r=r, q=q):
            return 1.0 if u <= 0 else float(stats.binom.sf(u - 1, r, q))

        slack = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
        want = min(f(v) + 2 * m * delta * slack, 1.0)
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("m,r,v,delta,printed", [
    (100, 100, 75, 0.0, 0.702),          # Appendix D, p. 45
    (100, 100, 75, 1e-4, 0.699),         # Appendix D, p. 46
    (1000, 100, 75, 1e-4, 0.673),        # Appendix D, p. 46: abstentions and the 2 m delta term
    (100000, 1510, 1439, 1e-5, 2.675),   # Section 7, p. 28 (Fig. 11)
])
def test_one_run_bound_reproduces_the_papers_printed_values(m, r, v, delta, printed):
    """Steinke, Nasr & Jagielski's printed lower bounds at 95% (three decimals, some rounded,
    some truncated: one unit of the last digit). Dropping the delta term gives 0.702 for the
    third row and 2.806 for the fourth; 2 r delta instead of 2 m delta gives 2.805."""
    assert one_run_epsilon(m, r, v, delta=delta, beta=0.05) == pytest.approx(printed, abs=1e-3)
    if delta == 0.0:   # Appendix D, p. 45: the p-value at eps = ln 3
        assert one_run_p_value(m, r, v, math.log(3), 0.0) == pytest.approx(0.553, abs=1e-3)


def test_random_scores_give_no_bound_mostly():
    b = bounds(lambda _, m, rng: (rng.random(m), rng.random(m) < 0.5), None, 500)
    assert (b == 0).mean() >= 0.92


def test_two_point_bound_and_clopper_pearson():
    assert clopper_pearson_upper(0, 100, 0.025) == pytest.approx(1 - 0.025 ** (1 / 100))
    # max(log((1 - FNR) / FPR), log((1 - FPR) / FNR)) = max(log 8, log 4.5)
    assert two_point_epsilon(0.1, 0.2, 0.0) == pytest.approx(math.log(0.8 / 0.1))
    rng = np.random.default_rng(1)
    eps = 2.0
    ok = 0
    for seed in range(50):
        rng = np.random.default_rng(seed)
        s1, m1 = randomised_response(eps, 2000, rng)
        s2, m2 = randomised_response(eps, 2000, rng)
        b = many_run_audit(s1 + rng.random(2000) * 0.1, m1, s2 + rng.random(2000) * 0.1, m2,
                           delta=DELTA)["epsilon_lower_bound"]
        ok += b <= eps
        assert b >= 0
    assert ok >= 46


def test_claim_warning_fires():
    with pytest.warns(RuntimeWarning, match="PRIVACY AUDIT FAILURE"):
        assert claim_warning(3.0, 2.0) is not None
    assert claim_warning(1.0, 2.0) is None
    assert claim_warning(1.0, None) is None


def test_bad_input_is_one_line_error():
    with pytest.raises(CRLError, match="delta"):
        one_run_audit([1.0, 2.0], [True, False], delta=1.5)
    with pytest.raises(CRLError, match="canary scores"):
        one_run_audit([1.0, np.inf], [True, False])
    with pytest.raises(CRLError, match="1 of 2 canaries were not scored"):
        one_run_audit([1.0, np.nan], [True, False])   # e.g. boundary on a sample budget


def test_canary_epsilon_warns_when_the_bound_beats_the_accountant():
    rng = np.random.default_rng(3)
    included = rng.random(400) < 0.5
    pooled_member = np.stack([included] + [rng.random(400) < 0.5 for _ in range(4)])
    pooled = pooled_member + 0.01 * rng.random((5, 400))   # a perfect attack on every model
    with pytest.warns(RuntimeWarning, match="PRIVACY AUDIT FAILURE"):
        out = canary_epsilon("loss", pooled[0], included, pooled, pooled_member,
                             claimed_epsilon=0.5)
    assert out["one_run"]["epsilon_lower_bound"] == out["one_run"]["ceiling"] > 0.5
    assert out["many_runs"]["epsilon_lower_bound"] > 0.5 and out["warning"]
    quiet = canary_epsilon("loss", rng.random(400), included, claimed_epsilon=0.5)
    assert quiet["warning"] is None and quiet["many_runs"] is None
    bad = canary_epsilon("loss", np.full(400, np.nan), included, claimed_epsilon=0.5)
    assert "were not scored" in bad["one_run"]["skipped"] and bad["warning"] is None


def test_epsilon_attack_name():
    assert epsilon_attack_name(None, ["loss", "lira"]) == "lira"
    assert epsilon_attack_name(None, ["loss", "gap"]) == "loss"
    assert epsilon_attack_name(None, ["gap"]) is None
    with pytest.raises(CRLError, match="epsilon_attack = 'rmia'"):
        epsilon_attack_name("rmia", ["loss"])


def test_dpsgd_canary_audit_reports_bound_beside_accountant(tmp_path, capsys):
    from crl.cli import main

    out = tmp_path / "run"
    code = main(["audit", "--epochs", "1", "--seeds", "0", "--quiet", "--shadows", "0",
                 "--subset", "300",
                 "--defenses", "dpsgd", "--attacks", "loss", "--references", "2",
                 "--canaries", "40", "--bootstrap", "50", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = json.loads((out / "results.json").read_text())[0]
    eps = row["canaries"]["epsilon_lower_bound"]
    assert eps["attack"] == "loss" and eps["delta"] == 1e-5
    assert eps["accountant_epsilon"] == row["defense_report"]["epsilon"] > 0
    one = eps["one_run"]
    assert 0 <= one["epsilon_lower_bound"] <= one["ceiling"] and one["canaries"] == 40
    assert "randomised canaries of this audit" in one["what"]
    assert "## Empirical epsilon lower bounds" in (out / "report.md").read_text()
