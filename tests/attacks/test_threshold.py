import numpy as np
import pytest
import torch
from scipy.stats import norm

from crl.attacks.base import REQUIREMENTS, AttackContext, build_attack
from crl.attacks.metrics import thresholded_balanced_accuracy
from crl.attacks.signals import Signals
from crl.attacks.threshold import (
    SCORE_FUNCTIONS,
    confidence_score,
    entropy_score,
    fit_per_class_thresholds,
    loss_score,
    mentr_score,
    modified_entropy,
)
from crl.core.errors import CRLError
from crl.core.registry import ATTACKS
from crl.models.gradients import input_gradient_norms


def test_modified_entropy_hand_computed():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    y = np.array([0, 2])
    # row 0: -(0.3) ln 0.7 - 0.2 ln 0.8 - 0.1 ln 0.9
    r0 = -0.3 * np.log(0.7) - 0.2 * np.log(0.8) - 0.1 * np.log(0.9)
    # row 1 (label 2): -(0.7) ln 0.3 - 0.1 ln 0.9 - 0.6 ln 0.4
    r1 = -0.7 * np.log(0.3) - 0.1 * np.log(0.9) - 0.6 * np.log(0.4)
    out = modified_entropy(p, y)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [r0, r1], rtol=1e-12)
    # the logit-based score is its negative
    logits = np.log(p)
    np.testing.assert_allclose(mentr_score(logits, y), -out, rtol=1e-9)


def test_scores_match_plain_formulas_on_moderate_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 5)) * 3
    y = rng.integers(0, 5, 50)
    p = torch.softmax(torch.tensor(z), 1).numpy()
    np.testing.assert_allclose(loss_score(z, y), np.log(p[np.arange(50), y]), rtol=1e-9)
    np.testing.assert_allclose(confidence_score(z), np.log(p.max(1)), rtol=1e-9)
    np.testing.assert_allclose(entropy_score(z), (p * np.log(p)).sum(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("score", [loss_score, confidence_score, entropy_score, mentr_score])
def test_huge_margins_still_rank(score):
    # margins 50, 60, ..., 100: float32 softmax would give identical (tied) values
    margins = np.arange(50.0, 101.0, 10.0)
    z = np.zeros((len(margins), 4))
    z[:, 1] = margins
    y = np.ones(len(margins), int)
    s = score(z, y)
    assert np.all(np.diff(s) > 0), s       # larger margin -> strictly more member-like
    f32 = torch.nn.functional.cross_entropy(torch.tensor(z, dtype=torch.float32),
                                            torch.tensor(y), reduction="none")
    assert (f32 == 0).all()                 # the failure mode the float64 path avoids


def test_threshold_input_errors():
    with pytest.raises(CRLError, match=r"labels must be \[3\] \(one per sample\)"):
        loss_score(np.zeros((3, 2)), [0, 1])
    with pytest.raises(CRLError, match=r"labels must lie in \[0, 2\)"):
        loss_score(np.zeros((2, 2)), [0, 2])
    with pytest.raises(CRLError, match="sum to 1"):
        modified_entropy(np.array([[0.5, 0.6]]), [0])


def test_input_gradient_norms_match_autograd(digits):
    torch.manual_seed(0)
    from crl.data.types import normalize
    from crl.models import create_model

    model = create_model("mlp", 1, 8, 10).double().float()
    idx = np.arange(6)
    got = input_gradient_norms(model, digits, idx, batch_size=4)
    for i in idx:
        x = normalize(digits.x[i:i + 1], digits.mean, digits.std).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x).double(), digits.y[i:i + 1])
        (g,) = torch.autograd.grad(loss, x)
        assert got[i] == pytest.approx(float(g.norm()), rel=1e-5)


def test_per_class_thresholds_transfer():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 6000)
    member = rng.random(6000) < 0.5
    shift = np.array([0.0, 5.0, -5.0])[labels]     # each class lives at its own level
    scores = rng.normal(size=6000) + 2.0 * member + shift
    t = fit_per_class_thresholds(scores[:3000], member[:3000], labels[:3000], 3)
    acc = thresholded_balanced_accuracy(scores[3000:], member[3000:], labels[3000:], t)
    assert acc == pytest.approx(norm.cdf(1.0), abs=0.03)   # per-class optimum Phi(d/2)
    one = np.full(3, fit_per_class_thresholds(scores[:3000], member[:3000],
                                              np.zeros(3000, int), 1)[0])
    assert thresholded_balanced_accuracy(scores[3000:], member[3000:], labels[3000:],
                                         one) < acc - 0.05
    with pytest.raises(CRLError, match="both members and non-members"):
        fit_per_class_thresholds(scores[:10], np.ones(10, bool), labels[:10], 3)
    with pytest.raises(CRLError, match="differ in length: 10, 10 and 9"):
        fit_per_class_thresholds(scores[:10], member[:10], labels[:9], 3)
    with pytest.raises(CRLError, match="labels must be 10 integers"):
        thresholded_balanced_accuracy(scores[:10], member[:10], labels[:9], t)
    with pytest.raises(CRLError, match=r"labels must lie in \[0, 2\)"):
        thresholded_balanced_accuracy(scores[:10], member[:10], labels[:10] * 0 + 2, t[:2])


def _signals(models, n, seed):
    rng = np.random.default_rng(seed)
    member = rng.random((models, n)) < 0.5
    labels = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (models, n, 3))
    logits[:, np.arange(n), labels] += 3.0 * member
    return Signals(logits, member, labels, np.arange(n))


def test_threshold_attacks_declare_inputs_and_use_shadows_when_present():
    target, shadow = _signals(3, 300, 0), _signals(2, 300, 1)
    for name in SCORE_FUNCTIONS:
        attack = build_attack(name)
        assert attack.name == name and type(attack).name == name
        assert attack.params == {} and attack.requirements() == frozenset()
        assert attack.optional_inputs() == frozenset({"shadows"}) and attack.min_references == 0
        alone = attack.run(AttackContext(target=target, num_classes=3))
        np.testing.assert_array_equal(alone.scores,
                                      SCORE_FUNCTIONS[name](target.logits[0], target.labels))
        assert alone.loo_scores.shape == (3, 300) and alone.per_class_thresholds is None
        both = attack.run(AttackContext(target=target, num_classes=3, shadow=shadow))
        np.testing.assert_array_equal(both.scores, alone.scores)
        assert both.per_class_thresholds.shape == (3,)
        acc = thresholded_balanced_accuracy(both.scores, target.member[0], target.labels,
                                            both.per_class_thresholds)
        assert 0.6 < acc <= 1.0                    # members have a 3-logit higher true class
    with pytest.raises(CRLError, match="loss.alpha: unknown parameter; expected one of: none"):
        build_attack("loss", {"alpha": 1})


def test_gradx_requires_input_gradients_and_uses_shadow_gradients():
    target, shadow = _signals(2, 50, 0), _signals(2, 60, 1)
    grads = {k: np.random.default_rng(k).random(50) for k in range(2)}
    attack = build_attack("gradx")
    assert attack.requirements() == frozenset({"input_gradients"})
    assert attack.optional_inputs() == frozenset({"shadows"})
    res = attack.run(AttackContext(target=target, num_classes=3, shadow=shadow,
                                   gradient_scores=grads.__getitem__))
    np.testing.assert_array_equal(res.scores, -grads[0])
    assert res.loo_scores is None and res.per_class_thresholds is None   # no shadow gradients
    shadow_grads = lambda k: 1.0 + 2.0 * ~shadow.member[k]   # noqa: E731 (members: flatter)
    res = attack.run(AttackContext(target=target, num_classes=3, shadow=shadow,
                                   gradient_scores=grads.__getitem__,
                                   shadow_gradient_scores=shadow_grads))
    assert res.per_class_thresholds.shape == (3,)
    with pytest.raises(CRLError, match="needs input-gradient norms"):
        attack.run(AttackContext(target=target, num_classes=3))


def test_every_registered_attack_declares_known_requirements():
    for name in ATTACKS.names():
        attack = build_attack(name)
        assert attack.name == name
        assert attack.requirements() <= REQUIREMENTS, name
        assert attack.optional_inputs() <= REQUIREMENTS, name
        assert set(attack.params) == set(type(attack).spec.names())
        assert ("references" in attack.requirements()) == (attack.min_references > 0)
