import numpy as np
import pytest
import torch

from crl.attacks.threshold import (confidence_score, entropy_score, input_gradient_norms,
                                   loss_score, mentr_score, modified_entropy)
from crl.errors import CRLError


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
