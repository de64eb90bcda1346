"""Score numerics, LiRA and RMIA on synthetic signals (numpy only, no model training)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm, trim_mean
from sklearn.metrics import roc_auc_score

from crl.attacks.base import AttackContext, build_attack
from crl.attacks.lira import lira_loo, lira_scores
from crl.attacks.rmia import rmia_loo, rmia_scores
from crl.attacks.scores import log_prob_true, logit_confidence
from crl.attacks.signals import Signals
from crl.core.errors import CRLError


def balanced_member(rng, m: int, n: int) -> np.ndarray:
    """[M, N]: every sample is IN for exactly half of the models (Carlini et al.'s construction)."""
    return np.argsort(rng.random((m, n)), axis=0) < m // 2


def logits_with_confidence(rng, phi: np.ndarray, labels: np.ndarray, c: int) -> np.ndarray:
    """Random logits [..., N, C] whose logit-confidence of the true label is exactly `phi`."""
    n = labels.shape[0]
    z = rng.normal(0.0, 2.0, phi.shape + (c,))
    idx = np.arange(n)
    z[..., idx, labels] = -np.inf
    z[..., idx, labels] = phi + logsumexp(z, axis=-1)
    return z


def gaussian_signals(m=64, n=300, c=4, d=1.5, s=1.0, spread=3.0, seed=0):
    """Per sample: phi ~ N(mu_out, s) on OUT models, N(mu_out + d s, s) on IN models."""
    rng = np.random.default_rng(seed)
    member = balanced_member(rng, m, n)
    mu_out = rng.normal(0.0, spread, n)
    phi = np.where(member, mu_out + d * s, mu_out) + s * rng.normal(size=(m, n))
    labels = rng.integers(0, c, n)
    return Signals(logits_with_confidence(rng, phi, labels, c), member, labels, np.arange(n)), phi


# ---------------------------------------------------------------- numerics


def test_huge_margins_stay_distinct_and_ordered():
    z = np.array([[50.0, 0, 0], [51.0, 0, 0], [80.0, 0, 0], [200.0, 0, 0], [0, 50.0, 0]])
    y = np.array([0, 0, 0, 0, 0])
    lc = logit_confidence(z, y)
    np.testing.assert_allclose(lc[:4], z[:4, 0] - math.log(2.0), rtol=0, atol=1e-12)
    assert lc[4] == pytest.approx(-50.0 - math.log1p(math.exp(-50.0)), abs=1e-12)
    lp = log_prob_true(z, y)
    assert np.all(np.diff(lp[:4]) > 0) and np.all(lp[:4] < 0)   # no rounding to log 1 = 0
    assert lp[0] == pytest.approx(-2.0 * math.exp(-50.0), rel=1e-9)
    # a float32 softmax ties all four confident rows at p = 1
    e32 = np.exp((z[:4] - z[:4].max(1, keepdims=True)).astype(np.float32))
    assert np.all(e32[:, 0] / e32.sum(1) == np.float32(1.0))


def test_log_prob_true_matches_log_softmax_on_moderate_logits():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 3, (2, 7, 5))
    y = rng.integers(0, 5, 7)
    ref = (z - logsumexp(z, axis=-1, keepdims=True))[:, np.arange(7), y]
    np.testing.assert_allclose(log_prob_true(z, y), ref, atol=1e-12)
    p = np.exp(ref)
    np.testing.assert_allclose(logit_confidence(z, y), np.log(p) - np.log1p(-p), atol=1e-9)


@pytest.mark.parametrize("z, y, msg", [
    (np.zeros((3, 1)), np.zeros(3, int), "classes>=2"),
    (np.zeros((3, 2)), np.zeros(4, int), "labels must be"),
    (np.zeros((3, 2)), np.array([0, 1, 2]), r"\[0, 2\)"),
    (np.array([[0.0, np.nan]]), np.array([0]), "NaN"),
])
def test_score_input_errors(z, y, msg):
    with pytest.raises(CRLError, match=msg):
        logit_confidence(z, y)


# ---------------------------------------------------------------- LiRA


def test_lira_online_reaches_closed_form_optimum():
    d = 1.5
    sig, phi = gaussian_signals(d=d)
    optimum = norm.cdf(d / math.sqrt(2.0))                       # 0.856
    truth = sig.member.ravel()
    naive = roc_auc_score(truth, phi.ravel())                     # one global threshold on phi
    assert naive < optimum - 0.15                                 # the task needs per-sample fits
    fixed = roc_auc_score(truth, lira_loo(sig, fixed_variance=True).ravel())
    assert abs(fixed - optimum) < 0.012
    per_sample = roc_auc_score(truth, lira_loo(sig).ravel())      # ~31 refs per sample: small loss
    assert optimum - 0.02 < per_sample < optimum + 0.01


def _small_signals(seed=3, m=7, n=12, c=3, flip=False):
    rng = np.random.default_rng(seed)
    member = balanced_member(rng, m, n)
    member[0] = rng.random(n) < 0.5
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 2, (m, n, c)) + 2.0 * member[:, :, None] * np.eye(c)[labels]
    lf = logits + rng.normal(0, 0.5, logits.shape) if flip else None
    return Signals(logits, member, labels, np.arange(100, 100 + n), lf)


def test_lira_matches_hand_computation():
    sig = _small_signals(m=9)
    phi = logit_confidence(sig.logits, sig.labels)
    refs = sig.member[1:]
    on = lira_scores(sig, 0)
    off = lira_scores(sig, 0, online=False)
    for j in range(sig.logits.shape[1]):
        vin, vout = phi[1:, j][refs[:, j]], phi[1:, j][~refs[:, j]]
        lr = (norm.logpdf(phi[0, j], vin.mean(), vin.std(ddof=1))
              - norm.logpdf(phi[0, j], vout.mean(), vout.std(ddof=1)))
        assert on[j] == pytest.approx(lr, rel=1e-9, abs=1e-9)
        cdf = norm.cdf(phi[0, j], vout.mean(), vout.std(ddof=1))
        assert off[j] == pytest.approx(math.log(cdf) - math.log1p(-cdf), rel=1e-7, abs=1e-7)


def test_lira_fixed_variance_is_pooled_within_sample():
    sig = _small_signals(m=9)
    phi = logit_confidence(sig.logits, sig.labels)[1:]
    out = ~sig.member[1:]
    mu = np.array([phi[out[:, j], j].mean() for j in range(phi.shape[1])])
    ss = sum(((phi[out[:, j], j] - mu[j]) ** 2).sum() for j in range(phi.shape[1]))
    var = ss / (out.sum(0) - 1).sum()
    z = (logit_confidence(sig.logits, sig.labels)[0] - mu) / math.sqrt(var)
    expect = norm.logcdf(z) - norm.logsf(z)
    got = lira_scores(sig, 0, online=False, fixed_variance=True)
    np.testing.assert_allclose(got, expect, atol=1e-9)


def test_lira_offline_has_no_ties_in_the_tails():
    sig, _ = gaussian_signals(m=8, n=3, d=0.0)
    lg = sig.logits.copy()
    idx = np.arange(3)
    lg[0, idx, sig.labels] += np.array([200.0, 300.0, -300.0])       # |z| in the hundreds
    s = lira_scores(Signals(lg, sig.member, sig.labels, sig.sample_idx), 0, online=False)
    assert np.isfinite(s).all() and s[1] > s[0] > 0 > s[2]


def test_lira_flip_is_mean_of_queries():
    sig = _small_signals(m=9, flip=True)
    same = Signals(sig.logits, sig.member, sig.labels, sig.sample_idx, sig.logits.copy())
    np.testing.assert_allclose(lira_scores(same, 0, use_flip=True), lira_scores(same, 0),
                               atol=1e-12)
    flipped_only = Signals(sig.logits_flip, sig.member, sig.labels, sig.sample_idx)
    for online in (True, False):
        both = lira_scores(sig, 0, use_flip=True, online=online)
        expect = 0.5 * (lira_scores(sig, 0, online=online)
                        + lira_scores(flipped_only, 0, online=online))
        np.testing.assert_allclose(both, expect, atol=1e-12)


def test_lira_flip_without_flipped_logits_is_an_error():
    sig = _small_signals()
    with pytest.raises(CRLError, match="logits_flip is None"):
        lira_scores(sig, 0, use_flip=True)
    with pytest.raises(CRLError, match="logits_flip is None"):
        build_attack("lira", {"flip": True}).run(AttackContext(target=sig, num_classes=3))


def test_lira_too_few_references_names_the_counts():
    m, n = 4, 5
    member = np.zeros((m, n), bool)
    member[:, :] = [[1, 0, 1, 0, 1], [1, 1, 0, 0, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    rng = np.random.default_rng(0)
    sig = Signals(rng.normal(size=(m, n, 3)), member, np.zeros(n, int), np.arange(50, 55))
    # sample 0: models 1..3 give 1 IN and 2 OUT
    with pytest.raises(CRLError, match=r"needs >= 2 IN and >= 2 OUT.*sample 0 \(dataset index 50\) "
                                       r"has 1 IN and 2 OUT"):
        lira_scores(sig, 0)
    with pytest.raises(CRLError, match="needs >= 2 OUT"):
        lira_scores(sig, 0, online=False)
    # fixed variance needs 1 and 1: sample 4 has 2 IN and 0 OUT among models 1..3
    with pytest.raises(CRLError,
                       match=r"needs >= 1 IN and >= 1 OUT.*sample 4 .* has 3 IN and 0 OUT"):
        lira_scores(sig, 0, fixed_variance=True)


def test_lira_fixed_variance_with_one_reference_each_falls_back_to_total_variance():
    rng = np.random.default_rng(5)
    n = 40
    member = np.zeros((3, n), bool)
    member[1] = rng.random(n) < 0.5
    member[2] = ~member[1]
    member[0] = rng.random(n) < 0.5
    sig = Signals(rng.normal(size=(3, n, 3)), member, rng.integers(0, 3, n), np.arange(n))
    attack = build_attack("lira", {"fixed_variance": True})
    res = attack.run(AttackContext(target=sig, num_classes=3))
    assert res.extra["variance"] == "total" and np.isfinite(res.scores).all()


def test_registered_lira_attacks():
    sig = _small_signals(m=9, flip=True)
    ctx = AttackContext(target=sig, num_classes=3)
    for name, online in (("lira", True), ("lira_offline", False)):
        for fixed in (False, True):
            res = build_attack(name, {"fixed_variance": fixed, "flip": True}).run(ctx)
            expect = lira_loo(sig, online=online, fixed_variance=fixed, use_flip=True)
            np.testing.assert_allclose(res.scores, expect[0])
            np.testing.assert_allclose(res.loo_scores, expect)
            assert res.loo_scores.shape == (9, 12)
    for name in ("lira", "lira_offline"):
        assert build_attack(name).requirements() == frozenset({"references"})
        assert build_attack(name, {"flip": True}).requirements() == frozenset({"references",
                                                                               "flip"})
        assert build_attack(name).optional_inputs() == frozenset()
        assert build_attack(name).min_references == 4
        assert build_attack(name, {"fixed_variance": True}).min_references == 2
    assert build_attack("lira").params == {"fixed_variance": False, "flip": False}
    with pytest.raises(CRLError, match="lira.fixed_variance = 'yes': expected true or false"):
        build_attack("lira", {"fixed_variance": "yes"})
    with pytest.raises(CRLError, match="lira.online: unknown parameter; expected one of: "
                                       "fixed_variance, flip"):
        build_attack("lira", {"online": False})
    with pytest.raises(CRLError, match="target model 9 out of range"):
        lira_scores(sig, 9)
    lonely = Signals(sig.logits[:1], sig.member[:1], sig.labels, sig.sample_idx)
    with pytest.raises(CRLError, match="needs reference models"):
        build_attack("lira").run(AttackContext(target=lonely, num_classes=3))


def test_lira_loo_skipped_is_reported_not_hidden():
    rng = np.random.default_rng(2)
    n = 6
    member = np.array([[1, 0, 1, 0, 1, 0]] + [[1, 1, 1, 0, 0, 0]] * 2
                      + [[0, 0, 0, 1, 1, 1]] * 2, bool)
    sig = Signals(rng.normal(size=(5, n, 3)), member, np.zeros(n, int), np.arange(n))
    res = build_attack("lira").run(AttackContext(target=sig, num_classes=3))
    assert res.scores.shape == (n,) and res.loo_scores is None
    assert "target 1" in res.extra["loo_skipped"]


# ---------------------------------------------------------------- RMIA


def rmia_setup(m=10, n=200, z=300, c=5, gap=1.5, seed=0):
    """Members get their true-class logit raised by `gap`; the population is never trained on."""
    rng = np.random.default_rng(seed)
    member = balanced_member(rng, m, n)
    hard = rng.normal(0, 1.5, n)                                    # per-sample difficulty
    labels = rng.integers(0, c, n)
    base = rng.normal(0, 1, (m, n, c))
    base[:, np.arange(n), labels] += hard + gap * member
    sig = Signals(base, member, labels, np.arange(n))
    zl = rng.integers(0, c, z)
    pz = rng.normal(0, 1, (m, z, c))
    pz[:, np.arange(z), zl] += rng.normal(0, 1.5, z)
    pop = Signals(pz, np.zeros((m, z), bool), zl, np.arange(1000, 1000 + z))
    return sig, pop


def brute_rmia(sig, pop, target, num_refs, a, gamma, offline, temperature=1.0, trim=0.0):
    k = num_refs
    p = np.exp(log_prob_true(sig.logits / temperature, sig.labels))
    pp = np.exp(log_prob_true(pop.logits / temperature, pop.labels))
    m = sig.num_models
    order = [(target + j) % m for j in range(1, m)]
    px = np.empty(p.shape[1])
    for j in range(p.shape[1]):
        ins = [r for r in order if sig.member[r, j]]
        outs = [r for r in order if not sig.member[r, j]]
        chosen = outs[:k] if offline else ins[:k // 2] + outs[:k - k // 2]
        px[j] = trim_mean(p[chosen, j], trim)
    pz = trim_mean(pp[order[:k]], trim, axis=0)
    if offline:
        px, pz = (1 + a) / 2 * px + (1 - a) / 2, (1 + a) / 2 * pz + (1 - a) / 2
    lr_x, lr_z = p[target] / px, pp[target] / pz
    return (lr_x[:, None] / lr_z[None, :] > gamma).mean(1)


@pytest.mark.parametrize("offline, k, a, gamma, temperature, trim",
                         [(True, 4, 0.3, 2.0, 1.0, 0.0), (True, 1, 1.0, 1.0, 1.0, 0.0),
                          (False, 4, 0.3, 1.5, 1.0, 0.0), (False, 3, 0.0, 2.0, 1.0, 0.0),
                          (True, 4, 0.3, 2.0, 2.0, 0.3), (False, 4, 0.0, 1.0, 0.5, 0.2)])
def test_rmia_matches_brute_force(offline, k, a, gamma, temperature, trim):
    sig, pop = rmia_setup(n=60, z=80)
    kw = {"num_refs": k, "a": a, "gamma": gamma, "offline": offline, "temperature": temperature,
          "trim": trim}
    for t in (0, 4):
        np.testing.assert_allclose(rmia_scores(sig, pop, t, **kw),
                                   brute_rmia(sig, pop, t, **kw), atol=1e-12)


def test_rmia_separates_members():
    sig, pop = rmia_setup(gap=2.5)
    loss_auc = roc_auc_score(sig.member[0], log_prob_true(sig.logits[0], sig.labels))
    for offline in (True, False):
        s = rmia_scores(sig, pop, 0, offline=offline)
        auc = roc_auc_score(sig.member[0], s)
        assert auc > 0.8 and auc > loss_auc + 0.03   # calibration by references beats the raw loss
        assert ((s >= 0) & (s <= 1)).all()
    loo = rmia_loo(sig, pop)
    assert loo.shape == sig.member.shape and roc_auc_score(sig.member.ravel(), loo.ravel()) > 0.8


def test_rmia_monotone_in_target_confidence():
    sig, pop = rmia_setup(n=30, z=100)
    lg, member = sig.logits.copy(), sig.member.copy()
    # sample 1 := sample 0 with the same references and label, but a more confident target
    lg[:, 1], member[:, 1] = lg[:, 0], member[:, 0]
    labels = sig.labels.copy()
    labels[1] = labels[0]
    for bump in (0.0, 0.5, 3.0, 60.0):
        lg[0, 1] = lg[0, 0]
        lg[0, 1, labels[0]] += bump
        s = rmia_scores(Signals(lg, member, labels, sig.sample_idx), pop, 0, gamma=1.0, a=0.3)
        assert s[1] >= s[0]
    assert s[1] == 1.0   # with a margin of 60, LR(x) beats every population sample


def test_rmia_uses_only_the_documented_references():
    sig, pop = rmia_setup(m=4, n=20, z=30)
    member = sig.member.copy()
    member[1] = False                                  # model 1 is OUT for every sample
    member[2:] = True
    sig = Signals(sig.logits, member, sig.labels, sig.sample_idx)
    before = rmia_scores(sig, pop, 0, num_refs=1, a=0.3)
    lg, pl = sig.logits.copy(), pop.logits.copy()
    lg[2:] += np.random.default_rng(9).normal(0, 5, lg[2:].shape)   # models never chosen
    pl[2:] += 7.0
    after = rmia_scores(Signals(lg, member, sig.labels, sig.sample_idx),
                        Signals(pl, pop.member, pop.labels, pop.sample_idx), 0, num_refs=1,
                        a=0.3)
    np.testing.assert_array_equal(before, after)


def test_rmia_num_refs_bounds_and_params():
    sig, pop = rmia_setup(m=5, n=20, z=10)
    with pytest.raises(CRLError, match="rmia.num_refs = 0: expected an integer >= 1"):
        rmia_scores(sig, pop, 0, num_refs=0)
    with pytest.raises(CRLError, match="num_refs=5 but only 4 reference models"):
        rmia_scores(sig, pop, 0, num_refs=5)
    with pytest.raises(CRLError, match=r"needs 3 OUT reference models per sample; sample \d+"):
        rmia_scores(sig, pop, 0, num_refs=3)                 # each sample is OUT for ~2 of 4
    for kw, msg in (({"a": 1.5}, r"rmia.a = 1.5: expected a number in \[0.0, 1.0\]"),
                    ({"gamma": 0.0}, "rmia.gamma = 0.0: expected a number > 0.0"),
                    ({"gamma": float("inf")}, "rmia.gamma = inf: expected a number > 0.0"),
                    ({"ref": 2}, "rmia.ref: unknown parameter")):
        with pytest.raises(CRLError, match=msg):
            rmia_scores(sig, pop, 0, num_refs=1, **kw)


def test_rmia_population_mismatches():
    sig, pop = rmia_setup(m=5, n=20, z=10, c=5)
    fewer = Signals(pop.logits[:4], pop.member[:4], pop.labels, pop.sample_idx)
    with pytest.raises(CRLError, match="population signals hold 4 models, expected 5"):
        rmia_scores(sig, fewer, 0, num_refs=1)
    other_c = Signals(pop.logits[:, :, :3], pop.member, pop.labels % 3, pop.sample_idx)
    with pytest.raises(CRLError, match="population logits have 3 classes, expected 5"):
        rmia_scores(sig, other_c, 0, num_refs=1)
    trained = pop.member.copy()
    trained[2, 7] = True
    with pytest.raises(CRLError, match=r"population sample 7 .* member of model 2"):
        rmia_scores(sig, Signals(pop.logits, trained, pop.labels, pop.sample_idx), 0, num_refs=1)


def test_registered_rmia():
    sig, pop = rmia_setup(m=10, n=40, z=50)
    res = build_attack("rmia").run(AttackContext(target=sig, num_classes=5, population=pop))
    np.testing.assert_allclose(res.scores, rmia_scores(sig, pop, 0))
    np.testing.assert_allclose(res.loo_scores, rmia_loo(sig, pop))
    assert build_attack("rmia").requirements() == frozenset({"references", "population"})
    assert build_attack("rmia").min_references == 4      # 1 OUT each + one pair to choose a
    assert build_attack("rmia", {"a": 0.3}).min_references == 2
    assert build_attack("rmia", {"num_refs": 2, "a": 0.3}).min_references == 4
    assert build_attack("rmia", {"num_refs": 3, "offline": False}).min_references == 4
    with pytest.raises(CRLError, match="needs population signals"):
        build_attack("rmia").run(AttackContext(target=sig, num_classes=5))
    with pytest.raises(CRLError, match="rmia.num_refs = 0: expected an integer >= 1"):
        build_attack("rmia", {"num_refs": 0})
    with pytest.raises(CRLError, match="rmia.offline"):
        build_attack("rmia", {"offline": "no"})
