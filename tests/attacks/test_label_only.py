"""Label-only attacks (gap, augment, boundary): they find membership in a model that memorises,
not in one at chance, and only ever read predicted labels."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from crl.attacks import AttackContext, Signals, build_attack
from crl.attacks.label_only import augmentations, translate
from crl.attacks.metrics import metrics_with_ci
from crl.core.errors import CRLError
from crl.engine.fit import fit
from crl.models import create_model
from crl.models.query import QueryAccess, QueryOracle
from crl.training.recipe import Recipe

N = 250   # members and non-members each


@pytest.fixture(scope="module")
def setting(digits):
    """Digits with random labels (fixed, seeded): an MLP trained on N members memorises them
    (its labels are noise), so membership is visible; a second MLP trained on other samples
    never saw the pool: membership is invisible to it."""
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, 10, len(digits)))
    data = dataclasses.replace(digits, y=y, content_hash="")
    perm = rng.permutation(len(data))
    members, nonmembers, other = perm[:N], perm[N:2 * N], perm[2 * N:2 * N + N]

    def train(idx):
        torch.manual_seed(0)
        return fit(create_model("mlp", 1, 8, 10), data, idx,
                   Recipe(epochs=40, batch_size=32, lr=0.05, device="cpu"), progress=False).model

    pool = np.concatenate([members, nonmembers])
    member = np.r_[np.ones(N, bool), np.zeros(N, bool)]
    return data, pool, member, train(members), train(other)


def context(data, pool, member, model) -> AttackContext:
    nan_logits = np.full((1, len(pool), 10), np.nan)   # attacks must not read these
    sig = Signals(logits=nan_logits, member=member[None], labels=data.y[pool].numpy(),
                  sample_idx=pool)
    return AttackContext(target=sig, num_classes=10, seed=0, queries=QueryAccess(
        data.x[pool], [model], data.mean, data.std, progress=False))


FAST_BOUNDARY = {"steps": 1, "grad_samples": 16, "search_steps": 8, "init_tries": 4}


def auc_interval(name, ctx, member, params=None):
    scores = build_attack(name, params).run(ctx).scores
    assert scores.shape == member.shape and np.isfinite(scores).all()
    return metrics_with_ci(scores, member, n_boot=200, seed=0)["auc_ci"]


@pytest.mark.parametrize("name,params", [("gap", None), ("augment", None),
                                         ("boundary", FAST_BOUNDARY)])
def test_attack_beats_chance_on_memorising_model(setting, name, params):
    data, pool, member, memoriser, _ = setting
    lo, _ = auc_interval(name, context(data, pool, member, memoriser), member, params)
    assert lo > 0.5


@pytest.mark.parametrize("name,params", [("gap", None), ("augment", None),
                                         ("boundary", FAST_BOUNDARY)])
def test_attack_at_chance_on_model_that_never_saw_the_pool(setting, name, params):
    data, pool, member, _, outsider = setting
    lo, hi = auc_interval(name, context(data, pool, member, outsider), member, params)
    assert lo <= 0.5 <= hi


def test_every_query_is_label_only(setting, monkeypatch):
    data, pool, member, memoriser, _ = setting
    created = []
    real_oracle = QueryAccess.oracle

    def spy(self, model=0, **kw):
        o = real_oracle(self, model, **kw)
        created.append(o)
        return o

    def refuse(*_a, **_k):
        raise AssertionError("a label-only attack read logits or gradients")

    monkeypatch.setattr(QueryAccess, "oracle", spy)
    monkeypatch.setattr(QueryOracle, "logits", refuse)
    monkeypatch.setattr(QueryOracle, "input_gradients", refuse)
    for name, params in [("gap", None), ("augment", None), ("boundary", FAST_BOUNDARY)]:
        build_attack(name, params).run(context(data, pool[:40], member[:40], memoriser))
    assert created and all(o.label_only and o.queries > 0 for o in created)


def test_boundary_is_seeded(setting):
    data, pool, member, memoriser, _ = setting
    ctx = context(data, pool[:30], member[:30], memoriser)
    a = build_attack("boundary", FAST_BOUNDARY).run(ctx).scores
    b = build_attack("boundary", FAST_BOUNDARY).run(ctx).scores
    np.testing.assert_array_equal(a, b)


def test_boundary_distance_of_a_linear_model_is_exact():
    """A two-class linear model w.x + b on [0, 1]^D: the distance to its boundary is
    |w.x + b| / |w|; the search finds it within a few percent."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        lin[1].weight[1] = 0.0
        lin[1].bias[1] = 0.0
        lin[1].bias[0] = -0.5 * lin[1].weight[0].sum()   # the boundary crosses the centre
    images = (torch.rand(64, 1, 4, 4) * 128 + 64).round().to(torch.uint8)
    x = images.float() / 255.0
    with torch.no_grad():
        z = lin(x)
        w, b = lin[1].weight[0], lin[1].bias[0]
        true = ((x.flatten(1) @ w + b).abs() / w.norm()).numpy()
    y = z.argmax(1).numpy()
    sig = Signals(logits=z.numpy()[None], member=np.zeros((1, 64), bool), labels=y,
                  sample_idx=np.arange(64))
    ctx = AttackContext(target=sig, num_classes=2, queries=QueryAccess(
        images, [lin], (0.0,), (1.0,), progress=False))
    est = build_attack("boundary", {"steps": 12, "grad_samples": 64,
                                    "search_steps": 20}).run(ctx).scores
    inside = true < 0.25   # boundary points that clipping to [0, 1] cannot hide
    assert inside.sum() > 10
    np.testing.assert_allclose(est[inside], true[inside], rtol=0.05)
    assert (est >= true - 1e-3).all()   # never closer than the true boundary
    white = build_attack("boundary_whitebox", {"search_steps": 20}).run(ctx).scores
    np.testing.assert_allclose(white[inside], true[inside], rtol=0.01)   # the gradient is normal


def test_whitebox_boundary_is_closer_and_beats_chance(setting):
    data, pool, member, memoriser, outsider = setting
    ctx = context(data, pool, member, memoriser)
    white = build_attack("boundary_whitebox").run(ctx).scores
    label_only = build_attack("boundary").run(ctx).scores
    assert (white <= label_only + 1e-6).mean() > 0.95
    assert metrics_with_ci(white, member, n_boot=200, seed=0)["auc_ci"][0] > 0.5
    lo, hi = auc_interval("boundary_whitebox", context(data, pool, member, outsider), member)
    assert lo <= 0.5 <= hi


def test_augmentations_and_translation():
    assert len(augmentations(1, True)) == 10 and len(augmentations(2, False)) == 9
    assert augmentations(0, False) == [(False, 0, 0)]
    assert all(abs(dx) + abs(dy) == 2 for _, dx, dy in augmentations(2, False)[1:])
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert translate(x, 1, 0)[0, 0].tolist() == [[0, 0, 1], [0, 3, 4], [0, 6, 7]]
    assert translate(x, 0, -1)[0, 0].tolist() == [[3, 4, 5], [6, 7, 8], [0, 0, 0]]


def test_missing_query_access_is_an_error(setting):
    data, pool, member, memoriser, _ = setting
    ctx = dataclasses.replace(context(data, pool, member, memoriser), queries=None)
    with pytest.raises(CRLError, match="query access"):
        build_attack("gap").run(ctx)


def test_augment_fitted_on_shadow_models(setting):
    """The paper's variant: a logistic regression on the shadow models' correctness vectors."""
    data, pool, member, memoriser, _ = setting
    rng = np.random.default_rng(1)
    shadow_pool = np.setdiff1d(np.arange(len(data)), pool)[:400]
    shadow_member = np.stack([rng.random(400) < 0.5 for _ in range(2)])
    shadows = []
    for k in range(2):
        torch.manual_seed(k)
        shadows.append(fit(create_model("mlp", 1, 8, 10), data, shadow_pool[shadow_member[k]],
                           Recipe(epochs=40, batch_size=32, lr=0.05, device="cpu"),
                           progress=False).model)
    ctx = context(data, pool, member, memoriser)
    ctx.shadow = Signals(logits=np.full((2, 400, 10), np.nan), member=shadow_member,
                         labels=data.y[shadow_pool].numpy(), sample_idx=shadow_pool)
    ctx.queries.shadow_images, ctx.queries.shadow_models = data.x[shadow_pool], shadows
    attack = build_attack("augment", {"fitted": True})
    assert "shadows" in attack.requirements()
    lo, _ = metrics_with_ci(attack.run(ctx).scores, member, n_boot=200, seed=0)["auc_ci"]
    assert lo > 0.5
    with pytest.raises(CRLError, match="expected shadow models"):
        attack.run(context(data, pool, member, memoriser))


@pytest.mark.parametrize("name", ["gap", "augment", "boundary", "boundary_whitebox"])
def test_attack_signals_explains_that_query_attacks_need_the_model(name):
    import crl

    rng = np.random.default_rng(0)
    with pytest.raises(CRLError, match="needs query access to the model"):
        crl.attack_signals(rng.normal(size=(1, 50, 10)), rng.integers(0, 10, 50),
                           rng.random((1, 50)) < 0.5, attack=name)


# ---------------------------------------------------------------- sample budget (per_class)


def test_boundary_scores_at_most_per_class_samples_of_each_class_seeded(setting):
    data, pool, member, memoriser, outsider = setting
    ctx = context(data, pool, member, memoriser)
    params = {**FAST_BOUNDARY, "steps": 0, "per_class": 3}
    a, b = (build_attack("boundary", params).run(ctx) for _ in range(2))
    labels = ctx.target.labels
    for c in range(10):   # min(3, class size) of every class
        assert a.scored[labels == c].sum() == min(3, (labels == c).sum())
    np.testing.assert_array_equal(a.scored, b.scored)   # the draw is seeded
    np.testing.assert_array_equal(a.scores, b.scores)
    other = build_attack("boundary", params).run(dataclasses.replace(ctx, seed=1))
    assert not np.array_equal(a.scored, other.scored)   # ... from the run seed
    defended = build_attack("boundary", params).run(context(data, pool, member, outsider))
    np.testing.assert_array_equal(a.scored, defended.scored)   # another model: same samples
    white = build_attack("boundary_whitebox", {"per_class": 3, "steps": 2}).run(ctx)
    assert white.scored.sum() == a.scored.sum()
    every = build_attack("boundary", {**params, "per_class": None}).run(ctx)
    assert every.scored.all()


def test_per_class_default_and_bad_value():
    attack = build_attack("boundary")
    assert attack.params["per_class"] == 500
    with pytest.raises(CRLError, match="per_class = 0: expected an integer >= 1 or null"):
        build_attack("boundary", {"per_class": 0})


class HalfScored:
    """An attack that scores every second sample with noise and gives the others a perfect
    (membership-revealing) value that no metric may see."""

    def __init__(self, member):
        rng = np.random.default_rng(3)
        self.scored = np.arange(len(member)) % 2 == 0
        self.scores = np.where(self.scored, rng.random(len(member)) + 0.3 * member,
                               1e6 * member)

    def run(self, ctx):
        from crl.attacks.base import AttackResult
        return AttackResult(scores=self.scores.copy(), scored=self.scored.copy())


def test_metrics_of_a_half_scored_attack_are_those_of_the_scored_half():
    from crl.attacks.metrics import roc
    from crl.audit.attacking import run_attack
    from crl.audit.outcome import Evaluation
    from crl.core.seeding import seed_for

    rng = np.random.default_rng(0)
    n = 400
    member = rng.random(n) < 0.5
    ctx = AttackContext(target=Signals(logits=np.zeros((1, n, 2)), member=member[None],
                                       labels=rng.integers(0, 2, n), sample_idx=np.arange(n)),
                        num_classes=2, seed=7)
    ev = Evaluation(np.arange(n), member, ~member)
    attack = HalfScored(member)
    out = run_attack("half", attack, ctx, ev, n_boot=50)
    half = attack.scored
    hand = metrics_with_ci(attack.scores[half], member[half], n_boot=50,
                           seed=seed_for(7, "bootstrap", "half"))
    assert out.metrics == hand and out.metrics["auc"] < 0.9   # the perfect half never entered
    assert out.extra["samples_scored"] == half.sum() and out.extra["samples_evaluated"] == n
    assert np.isnan(out.scores[~half]).all()
    for got, want in zip(roc(out.scores, member), roc(attack.scores[half], member[half])):
        np.testing.assert_array_equal(got, want)


def test_scored_mask_is_checked():
    from crl.attacks.base import AttackResult

    with pytest.raises(CRLError, match="expected a bool mask of shape"):
        AttackResult(scores=np.zeros(4), scored=np.ones(3, bool))
    with pytest.raises(CRLError, match="no leave-one-out"):
        AttackResult(scores=np.zeros(4), scored=np.ones(4, bool), loo_scores=np.zeros((2, 4)))


def test_report_header_says_how_many_samples_an_attack_scored():
    from types import SimpleNamespace

    from crl.report.tables import _sampled

    a = SimpleNamespace(extra={"samples_scored": 5000, "samples_evaluated": 30000})
    outcome = SimpleNamespace(attacks={"boundary": a, "loss": SimpleNamespace(extra={})})
    assert "boundary: 5,000 of 30,000" in _sampled([outcome])
    assert _sampled([SimpleNamespace(attacks={})]) == ""
