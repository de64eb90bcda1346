import json

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from crl.attacks.metrics import (
    CI_METRICS,
    _curve_metrics,
    _Side,
    attack_metrics,
    metrics_with_ci,
    paired_difference,
    pooled_ci,
    roc,
)
from crl.core.errors import CRLError

D = 1.0
TRUTH = {"auc": norm.cdf(D / np.sqrt(2)), "tpr_at_1pct_fpr": norm.cdf(D + norm.ppf(0.01))}


def gaussian(n: int, d: float = D, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n members ~ N(d, 1), n non-members ~ N(0, 1): AUC = Phi(d / sqrt 2),
    TPR at FPR f = Phi(d + Phi^-1(f))."""
    rng = np.random.default_rng(seed)
    return np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)], np.r_[np.ones(n, bool),
                                                                  np.zeros(n, bool)]


def brute_tpr_at(scores, member, target) -> float:
    """Max TPR over every threshold 'member iff score >= t' whose FPR <= target."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        if pred[~member].mean() <= target + 1e-12:
            best = max(best, pred[member].mean())
    return best


# ---------------------------------------------------------------- point metrics


def test_metrics_match_sklearn_on_synthetic_scores():
    rng = np.random.default_rng(0)
    member = rng.random(3000) < 0.5
    scores = rng.normal(size=3000) + 0.7 * member
    m = attack_metrics(scores, member)
    assert m["auc"] == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max())
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(brute_tpr_at(scores, member, 0.001))
    assert m["oracle_balanced_accuracy"] == pytest.approx(np.max((tpr + 1 - fpr) / 2))
    for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "oracle_balanced_accuracy"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0
    assert "balanced_accuracy" not in m


def test_metrics_match_closed_form_on_gaussian_scores():
    # best balanced accuracy of a Gaussian shift = Phi(d / 2)
    d = 1.5
    scores, member = gaussian(200_000, d, seed=1)
    m = attack_metrics(scores, member)
    assert m["auc"] == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=3e-3)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.01)), abs=6e-3)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.001)), abs=6e-3)
    assert m["tpr_at_0.01pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.0001)), abs=6e-3)
    assert m["oracle_balanced_accuracy"] == pytest.approx(norm.cdf(d / 2), abs=3e-3)


def test_tied_scores_use_every_achievable_roc_point():
    # 10 members alone at the top, then 190 tie groups of one member and one non-member each:
    # lowering the threshold walks a straight ROC segment, whose inner points sklearn's
    # drop_intermediate=True removes (the old computation's value).
    n_pairs = 190
    scores = np.r_[np.arange(1000.0, 1010.0), np.arange(n_pairs), np.arange(n_pairs)]
    member = np.r_[np.ones(10 + n_pairs, bool), np.zeros(n_pairs, bool)]
    m = attack_metrics(scores, member)
    truth = brute_tpr_at(scores, member, 0.01)        # top 10 + 1 tie group: 11 / 200
    assert truth == pytest.approx(11 / 200)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(truth)
    fpr, tpr, _ = roc_curve(member, scores)           # drop_intermediate=True
    assert tpr[fpr <= 0.01].max() < truth             # what the old code reported
    fpr_all, _ = roc(scores, member)
    assert len(fpr_all) >= n_pairs                    # the plotted curve keeps every point


def test_unresolvable_low_fpr_is_null_not_faked():
    rng = np.random.default_rng(2)
    m = attack_metrics(rng.normal(size=200), np.r_[np.ones(100), np.zeros(100)])
    assert m["tpr_at_1pct_fpr"] is not None          # 1% of 100 non-members: resolvable
    assert m["tpr_at_0.1pct_fpr"] is None and m["tpr_at_0.01pct_fpr"] is None
    assert m["min_resolvable_fpr"] == pytest.approx(0.01)
    assert json.loads(json.dumps(m))["tpr_at_0.01pct_fpr"] is None   # JSON null


def test_metric_input_errors():
    with pytest.raises(CRLError, match="differ in length"):
        attack_metrics([0.1, 0.2], [1])
    with pytest.raises(CRLError, match="both members and non-members"):
        attack_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(CRLError, match="infinite"):
        attack_metrics([0.1, np.inf], [1, 0])
    with pytest.raises(CRLError, match="among the scored samples, got 1 and 0"):
        attack_metrics([0.1, np.nan], [1, 0])   # NaN: not scored, left out


# ---------------------------------------------------------------- bootstrap


def test_replicate_engine_equals_metrics_of_an_explicit_resample():
    rng = np.random.default_rng(4)
    member = rng.random(20_000) < 0.4                          # ~12,000 non-members
    scores = np.round(rng.normal(size=20_000) + member, 1)    # many ties
    side = _Side(scores, member)
    for _ in range(3):
        mem, non = np.flatnonzero(member), np.flatnonzero(~member)
        draws = [rng.integers(0, len(pos), (1, len(pos))) for pos in (mem, non)]
        w1, w0 = (side.counts(d, side.item_groups(pos)) for d, pos in zip(draws, (mem, non)))
        got = _curve_metrics(w1, w0, CI_METRICS)
        idx = np.r_[mem[draws[0][0]], non[draws[1][0]]]
        expect = attack_metrics(scores[idx], member[idx])
        assert expect["tpr_at_0.01pct_fpr"] is not None
        for key in CI_METRICS:
            assert got[key][0] == pytest.approx(expect[key], abs=1e-12), key


def test_ci_covers_the_truth_at_about_the_nominal_rate():
    covered = dict.fromkeys(TRUTH, 0)
    for r in range(40):
        out = metrics_with_ci(*gaussian(300, seed=100 + r), seed=r)
        for k, truth in TRUTH.items():
            lo, hi = out[f"{k}_ci"]
            covered[k] += lo <= truth <= hi
            assert lo <= out[k] <= hi
    assert all(c >= 34 for c in covered.values()), covered    # nominal 95%: 38 of 40


def test_ci_shrinks_with_n():
    def width(n):
        lo, hi = metrics_with_ci(*gaussian(n, seed=7), seed=0)["auc_ci"]
        return hi - lo

    assert 2.0 < width(500) / width(4000) < 4.5                 # sqrt(8) = 2.83


def test_ci_is_none_where_the_point_is_none_and_deterministic():
    scores, member = gaussian(300, seed=3)
    out = metrics_with_ci(scores, member, n_boot=50, seed=5)
    assert out["tpr_at_0.1pct_fpr"] is None and out["tpr_at_0.1pct_fpr_ci"] is None
    assert out["tpr_at_0.01pct_fpr_ci"] is None and len(out["auc_ci"]) == 2
    assert out == metrics_with_ci(scores, member, n_boot=50, seed=5)
    assert out["auc_ci"] != metrics_with_ci(scores, member, n_boot=50, seed=6)["auc_ci"]
    json.dumps(out)


def test_pooled_ci_covers_the_truth():
    covered = 0
    for r in range(20):
        groups = [gaussian(300, seed=500 + 3 * r + g) for g in range(3)]
        mean, lo, hi = pooled_ci(groups, "auc", n_boot=200, seed=r)
        assert mean == pytest.approx(np.mean([roc_auc_score(m, s) for s, m in groups]))
        assert lo < mean < hi
        covered += lo <= TRUTH["auc"] <= hi
    assert covered >= 17
    # one seed of n samples vs three seeds of n: pooling narrows the interval
    _, lo1, hi1 = pooled_ci([gaussian(300, seed=9)], "auc", seed=0)
    _, lo3, hi3 = pooled_ci([gaussian(300, seed=9 + g) for g in range(3)], "auc", seed=0)
    assert hi3 - lo3 < hi1 - lo1
    assert pooled_ci([gaussian(300)], "tpr_at_0.1pct_fpr") == (None, None, None)


def test_paired_difference_identical_and_strongly_different():
    scores, member = gaussian(500, seed=11)
    ids = np.arange(1000)
    same = paired_difference((ids, scores, member), (ids, scores, member), "auc", seed=0)
    assert same == {"diff": 0.0, "ci": [0.0, 0.0], "within_noise": True}
    weak, _ = gaussian(500, d=0.0, seed=12)
    res = paired_difference((ids, scores, member), (ids, weak, member), "auc", seed=0)
    assert res["within_noise"] is False and res["ci"][0] > 0
    truth = TRUTH["auc"] - 0.5
    assert res["ci"][0] <= truth <= res["ci"][1]
    tpr = paired_difference((ids, scores, member), (ids, weak, member), "tpr_at_1pct_fpr")
    assert tpr["within_noise"] is False


def test_paired_difference_of_equally_strong_attacks_is_mostly_within_noise():
    within = 0
    for r in range(20):
        rng = np.random.default_rng(2000 + r)
        scores, member = gaussian(500, seed=900 + r)
        a, b = scores + rng.normal(0, 0.5, 1000), scores + rng.normal(0, 0.5, 1000)
        ids = np.arange(1000)
        within += paired_difference((ids, a, member), (ids, b, member), "auc", seed=r)[
            "within_noise"]
    assert within >= 17


def test_paired_difference_with_held_out_members_on_one_side():
    scores, member = gaussian(500, seed=13)
    ids = np.arange(1000) + 40_000
    keep = np.ones(1000, bool)
    keep[:100] = False                               # b's defense held 100 members out
    b = (ids[keep][::-1], scores[keep][::-1], member[keep][::-1])   # any order
    res = paired_difference((ids, scores, member), b, "auc", seed=0)
    expect = roc_auc_score(member, scores) - roc_auc_score(member[keep], scores[keep])
    assert res["diff"] == pytest.approx(expect)
    assert res["ci"][0] <= res["diff"] <= res["ci"][1] and res["within_noise"] is True
    flipped = (ids[495:505], scores[495:505], ~member[495:505])
    with pytest.raises(CRLError, match="member on one side and a non-member on the other"):
        paired_difference((ids, scores, member), flipped, "auc")
    unresolved = paired_difference((ids, scores, member), b, "tpr_at_0.1pct_fpr")
    assert unresolved == {"diff": None, "ci": None, "within_noise": None}


@pytest.mark.parametrize("kwargs, msg", [
    (dict(n_boot=0), r"bootstrap.n_boot = 0: expected an integer >= 1"),
    (dict(level=1.0), r"bootstrap.level = 1.0: expected a number in \(0.0, 1.0\)"),
    (dict(seed=-1), r"seed = -1: expected an integer >= 0"),
])
def test_interval_argument_errors(kwargs, msg):
    scores, member = gaussian(50)
    with pytest.raises(CRLError, match=msg):
        metrics_with_ci(scores, member, **kwargs)


def test_interval_metric_and_shape_errors():
    scores, member = gaussian(50)
    ids = np.arange(100)
    with pytest.raises(CRLError, match=r"bootstrap.metric = 'oracle_balanced_accuracy': "
                                       r"expected one of: auc, tpr_at_1pct_fpr"):
        pooled_ci([(scores, member)], "oracle_balanced_accuracy")
    with pytest.raises(CRLError, match="at least one"):
        pooled_ci([], "auc")
    with pytest.raises(CRLError, match=r"pooled_ci group 1: expected \(scores, is_member\)"):
        pooled_ci([(scores, member), scores], "auc")
    with pytest.raises(CRLError, match="sample_ids must be 100 distinct ids"):
        paired_difference((np.zeros(100), scores, member), (ids, scores, member), "auc")
    with pytest.raises(CRLError, match=r"expected \(sample_ids, scores, is_member\)"):
        paired_difference((scores, member), (ids, scores, member), "auc")
