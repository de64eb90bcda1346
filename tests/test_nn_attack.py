"""The paper's NN attack on tiny synthetic shadow/target signals (CPU, a few seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from crl.attacks.base import AttackContext, build_attack
from crl.attacks.nn_shadow import (attack_features, build_attack_mlp, nn_attack_scores,
                                   train_nn_attack)
from crl.attacks.signals import Signals
from crl.errors import CRLError

C = 4
FAST = {"epochs": 15, "patience": 5}


def separable_signals(models: int, n: int, seed: int, member_frac: float = 0.5) -> Signals:
    """Members: true-class logit ~ +6 above the rest; non-members: a near-uniform posterior."""
    rng = np.random.default_rng(seed)
    member = rng.random((models, n)) < member_frac
    labels = rng.integers(0, C, n)
    logits = rng.normal(0, 0.5, (models, n, C))
    logits[:, np.arange(n), labels] += np.where(member, 6.0, 0.3) + rng.normal(0, 0.5, (models, n))
    return Signals(logits, member, labels, np.arange(n))


def ctx(seed=0, target_seed=1):
    return AttackContext(target=separable_signals(1, 200, target_seed), num_classes=C, seed=seed,
                         shadow=separable_signals(3, 200, 100 + seed))


def test_features_are_posterior_and_one_hot():
    z = np.array([[[100.0, 0, 0, 0], [0, 1.0, 2.0, 3.0]]])
    f = attack_features(z, np.array([0, 2]), C)
    assert f.shape == (2, 2 * C) and f.dtype == np.float32
    np.testing.assert_allclose(f[:, :C].sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(f[:, C:], [[1, 0, 0, 0], [0, 0, 1, 0]])
    with pytest.raises(CRLError, match="3 classes, expected 4"):
        attack_features(np.zeros((2, 3)), np.zeros(2, int), C)


def test_nn_attack_learns_separable_task():
    res = build_attack("nn", FAST).run(ctx())
    target = ctx().target
    assert res.scores.shape == (200,) and res.scores.dtype == np.float64
    assert ((res.scores >= 0) & (res.scores <= 1)).all()
    assert roc_auc_score(target.member[0], res.scores) > 0.9
    assert res.extra["shadow_val_auc"] > 0.9
    assert 1 <= res.extra["best_epoch"] <= res.extra["epochs_run"] <= FAST["epochs"]
    assert res.loo_scores is None


def test_all_layers_registered_and_trained():
    sh = separable_signals(3, 200, 7)
    x = attack_features(sh.logits, sh.labels, C)
    torch.manual_seed(0)
    model = build_attack_mlp(2 * C, (128, 64), 0.2)
    params = list(model.parameters())
    # [in, 128, 64, 1]: three Linear layers, a weight and a bias each
    assert len(params) == 6
    assert [tuple(p.shape) for p in params] == [(128, 2 * C), (128,), (64, 128), (64,),
                                                (1, 64), (1,)]
    assert isinstance(model, nn.Sequential)
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.2 for m in model) == 2
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    fit = train_nn_attack(x, sh.member.reshape(-1), seed=0, model=model, **FAST)
    assert fit.model is model
    for k, v in fit.model.named_parameters():
        assert not torch.equal(before[k], v.detach()), f"parameter {k} was not trained"
    assert len(fit.history) == fit.epochs_run


def test_deterministic_and_leaves_global_rng_alone():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = build_attack("nn", FAST).run(ctx(seed=3))
    assert torch.equal(state, torch.get_rng_state()) and torch.get_num_threads() == threads
    b = build_attack("nn", FAST).run(ctx(seed=3))
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.extra == b.extra
    c = build_attack("nn", FAST).run(AttackContext(target=ctx(3).target, num_classes=C, seed=4,
                                                   shadow=ctx(3).shadow))
    assert not np.array_equal(a.scores, c.scores)


def test_target_ground_truth_is_never_used():
    c = ctx(seed=2)
    t = c.target
    flipped = Signals(t.logits, ~t.member, t.labels, t.sample_idx)
    a = build_attack("nn", FAST).run(c)
    b = build_attack("nn", FAST).run(AttackContext(target=flipped, num_classes=C, seed=2,
                                                   shadow=c.shadow))
    np.testing.assert_array_equal(a.scores, b.scores)
    assert a.extra == b.extra


def test_imbalanced_shadow_gets_class_weight():
    sh = separable_signals(2, 300, 11, member_frac=0.25)
    x = attack_features(sh.logits, sh.labels, C)
    y = sh.member.reshape(-1)
    fit = train_nn_attack(x, y, seed=0, epochs=3, patience=2)
    assert fit.pos_weight == pytest.approx((~y).sum() / y.sum(), rel=0.05)
    s = nn_attack_scores(fit.model, x)
    assert roc_auc_score(y, s) > 0.9


def test_nn_attack_errors():
    with pytest.raises(CRLError, match="needs shadow models"):
        build_attack("nn").run(AttackContext(target=separable_signals(1, 10, 0), num_classes=C))
    with pytest.raises(CRLError, match="shadow logits have 4 classes, expected num_classes=5"):
        build_attack("nn").run(AttackContext(target=separable_signals(1, 10, 0), num_classes=5,
                                             shadow=separable_signals(2, 10, 1)))
    with pytest.raises(CRLError, match="unknown parameter 'nn.layers'"):
        build_attack("nn", {"layers": 3})
    with pytest.raises(CRLError, match="dropout must be in"):
        build_attack("nn", {"dropout": 1.0})
    for bad in ((), (128, 0), "128", (64.5,)):
        with pytest.raises(CRLError, match="hidden must be"):
            build_attack("nn", {"hidden": bad})
    all_members = separable_signals(2, 10, 1, member_frac=1.0)
    with pytest.raises(CRLError, match="shadow non-members .* got 0"):
        build_attack("nn").run(AttackContext(target=separable_signals(1, 10, 0), num_classes=C,
                                             shadow=all_members))
    with pytest.raises(CRLError, match="epochs must be an integer >= 1"):
        train_nn_attack(np.zeros((10, 8)), np.arange(10) % 2, epochs=0)
    with pytest.raises(CRLError, match="Linear layer taking 8 inputs"):
        train_nn_attack(np.zeros((10, 8)), np.arange(10) % 2, model=build_attack_mlp(6))
    assert build_attack("nn").needs == frozenset({"shadows"})
