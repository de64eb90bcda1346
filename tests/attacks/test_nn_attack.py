"""The paper's NN attack on tiny synthetic shadow/target signals (CPU, a few seconds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from crl.attacks.base import AttackContext, build_attack
from crl.attacks.nn_shadow import (
    attack_features,
    build_attack_mlp,
    nn_attack_scores,
    sample_holdout,
    train_nn_attack,
)
from crl.attacks.signals import Signals
from crl.core.errors import CRLError

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
    with pytest.raises(CRLError, match="nn.layers: unknown parameter; expected one of: hidden"):
        build_attack("nn", {"layers": 3})
    with pytest.raises(CRLError, match=r"nn.dropout = 1.0: expected a number in \[0.0, 1.0\)"):
        build_attack("nn", {"dropout": 1.0})
    for bad in ((), (128, 0), "12a", (64.5,), True, "", None):
        with pytest.raises(CRLError, match=r"nn.hidden = .*: expected layer widths"):
            build_attack("nn", {"hidden": bad})
    all_members = separable_signals(2, 10, 1, member_frac=1.0)
    with pytest.raises(CRLError, match="shadow non-members .* got 0"):
        build_attack("nn").run(AttackContext(target=separable_signals(1, 10, 0), num_classes=C,
                                             shadow=all_members))
    with pytest.raises(CRLError, match="nn.epochs = 0: expected an integer >= 1"):
        train_nn_attack(np.zeros((10, 8)), np.arange(10) % 2, epochs=0)
    with pytest.raises(CRLError, match="Linear layer taking 8 inputs"):
        train_nn_attack(np.zeros((10, 8)), np.arange(10) % 2, model=build_attack_mlp(6))
    with pytest.raises(CRLError, match="sample_ids must be \\[10\\]"):
        train_nn_attack(np.zeros((10, 8)), np.arange(10) % 2, sample_ids=np.arange(9))


def test_params_and_requirements():
    attack = build_attack("nn")
    assert attack.requirements() == frozenset({"shadows"})
    assert attack.optional_inputs() == frozenset() and attack.min_references == 0
    assert attack.params["hidden"] == "128,64" and attack.params["epochs"] == 100
    for given in ([32, 16], (32, 16), "32, 16", "32,16"):
        assert build_attack("nn", {"hidden": given}).params["hidden"] == "32,16"
    assert build_attack("nn", {"hidden": 32}).params["hidden"] == "32"
    model = build_attack_mlp(2 * C, "32,16", 0.1)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [32, 16, 1]
    with pytest.raises(CRLError, match="nn.input size = 0: expected an integer >= 1"):
        build_attack_mlp(0)


def test_model_selection_holds_out_whole_samples():
    sh = separable_signals(4, 300, 5)
    rows_member = sh.member.reshape(-1)
    ids = np.tile(sh.sample_idx, sh.num_models)            # the attack's row -> sample map
    tr, va = sample_holdout(rows_member, ids, 0.2, np.random.default_rng(0))
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(ids)
    assert len(np.intersect1d(ids[tr], ids[va])) == 0     # no sample on both sides
    assert len(np.unique(ids[va])) == pytest.approx(60, abs=5)
    for part in (tr, va):
        assert rows_member[part].any() and (~rows_member[part]).any()
    # one shadow model: a split of the samples stratified by membership
    one = separable_signals(1, 200, 6)
    tr, va = sample_holdout(one.member[0], one.sample_idx, 0.2, np.random.default_rng(0))
    assert int(one.member[0][va].sum()) == round(0.2 * one.member[0].sum())
    # the registered attack holds out ~20% of the shadow-pool samples, every row of each
    res = build_attack("nn", FAST).run(AttackContext(target=separable_signals(1, 50, 1),
                                                     num_classes=C, shadow=sh))
    assert res.extra["shadow_val_samples"] == pytest.approx(60, abs=5)
    assert res.extra["shadow_rows"] == 4 * 300
