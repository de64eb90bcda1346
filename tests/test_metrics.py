import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from crl.errors import CRLError
from crl.metrics import attack_metrics, fit_per_class_thresholds, thresholded_balanced_accuracy


def test_metrics_match_sklearn_on_synthetic_scores():
    rng = np.random.default_rng(0)
    member = rng.random(3000) < 0.5
    scores = rng.normal(size=3000) + 0.7 * member
    m = attack_metrics(scores, member)
    assert m["auc"] == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(member, scores)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(tpr[fpr <= 0.01].max())
    assert m["balanced_accuracy"] == pytest.approx(np.max((tpr + 1 - fpr) / 2))
    for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0


def test_metrics_match_closed_form_on_gaussian_scores():
    # members ~ N(d, 1), non-members ~ N(0, 1): AUC = Phi(d / sqrt 2), TPR@FPR = Phi(d + Phi^-1(FPR)),
    # best balanced accuracy = Phi(d / 2).
    rng = np.random.default_rng(1)
    d, n = 1.5, 200_000
    scores = np.r_[rng.normal(d, 1, n), rng.normal(0, 1, n)]
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    m = attack_metrics(scores, member)
    assert m["auc"] == pytest.approx(norm.cdf(d / np.sqrt(2)), abs=3e-3)
    assert m["tpr_at_1pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.01)), abs=6e-3)
    assert m["tpr_at_0.1pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.001)), abs=6e-3)
    assert m["tpr_at_0.01pct_fpr"] == pytest.approx(norm.cdf(d + norm.ppf(0.0001)), abs=6e-3)
    assert m["balanced_accuracy"] == pytest.approx(norm.cdf(d / 2), abs=3e-3)


def test_unresolvable_low_fpr_is_omitted_not_faked():
    rng = np.random.default_rng(2)
    m = attack_metrics(rng.normal(size=200), np.r_[np.ones(100), np.zeros(100)])
    assert "tpr_at_0.01pct_fpr" not in m
    assert m["min_resolvable_fpr"] == pytest.approx(0.01)


def test_metric_input_errors():
    with pytest.raises(CRLError, match="differ in length"):
        attack_metrics([0.1, 0.2], [1])
    with pytest.raises(CRLError, match="both members and non-members"):
        attack_metrics([0.1, 0.2], [1, 1])
    with pytest.raises(CRLError, match="NaN"):
        attack_metrics([0.1, np.nan], [1, 0])


def test_per_class_thresholds_transfer():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 6000)
    member = rng.random(6000) < 0.5
    shift = np.array([0.0, 5.0, -5.0])[labels]     # each class lives at its own level
    scores = rng.normal(size=6000) + 2.0 * member + shift
    t = fit_per_class_thresholds(scores[:3000], member[:3000], labels[:3000], 3)
    acc = thresholded_balanced_accuracy(scores[3000:], member[3000:], labels[3000:], t)
    assert acc == pytest.approx(norm.cdf(1.0), abs=0.03)   # per-class optimum Phi(d/2)
    one = np.full(3, fit_per_class_thresholds(scores[:3000], member[:3000], np.zeros(3000, int), 1)[0])
    assert thresholded_balanced_accuracy(scores[3000:], member[3000:], labels[3000:], one) < acc - 0.05
