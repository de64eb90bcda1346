"""Baseline defenses: label_smoothing, confidence_penalty, early_stopping, advreg, dmp, dpsgd.

Tiny CPU fits on digits (mlp, a few epochs); each test checks the defense does what it claims.
"""
from __future__ import annotations

import copy
import itertools
import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crl.defenses  # noqa: F401  (registers every defense)
from crl.core.errors import CRLError
from crl.core.registry import DEFENSES
from crl.data.splits import make_pool_split
from crl.data.types import ImageData, normalize
from crl.defenses.base import Step, TrainContext, build_defense, default_sampler
from crl.engine.fit import fit
from crl.models import create_model
from crl.training.recipe import Recipe
from crl.training.sampling import PoissonBatches

NAMES = ["label_smoothing", "confidence_penalty", "early_stopping", "advreg", "dmp", "dpsgd"]
HELD_OUT = ["early_stopping", "advreg", "dmp"]


@pytest.fixture(scope="module")
def members(digits):
    """The digits default's 100 target members (400-sample subset) and 100 non-members."""
    split = make_pool_split(digits.y.numpy(), seed=0, subset=400)
    return split.target_members, split.target_nonmembers


def mlp(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", 1, 8, 10)


def conv_bn(seed=0):
    """A tiny Conv+BatchNorm model (Opacus must replace the BatchNorm)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * 64, 16), nn.ReLU(inplace=True),
                         nn.Linear(16, 10))


def recipe(epochs, batch=32, lr=0.05, seed=0):
    return Recipe(epochs=epochs, batch_size=batch, lr=lr, seed=seed, device="cpu")


def run(data, idx, name, params=None, epochs=3, model=None, batch=32, **kw):
    defense = build_defense(name, params)
    res = fit(model or mlp(), data, idx, recipe(epochs, batch), defense, progress=False, **kw)
    return res, defense


def make_ctx(data, idx, model=None, epochs=3, batch=32):
    model = model or mlp()
    rec = recipe(epochs, batch)
    return TrainContext(data=data, recipe=rec, model=model,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                        train_idx=torch.as_tensor(np.asarray(idx)), device=torch.device("cpu"),
                        feat_dim=None, sampler=default_sampler(rec))


def make_step(ctx, idx, epoch=1, logits=None):
    """A fit-like Step of one model: leading model axis of 1."""
    idx = torch.as_tensor(np.asarray(idx))
    x = normalize(ctx.data.x[idx], ctx.data.mean, ctx.data.std)
    logits = ctx.model(x) if logits is None else logits
    return Step(x=x[None], y=ctx.data.y[idx][None], idx=idx[None], logits=logits[None],
                features=None, epoch=epoch, step=1)


def prepared(defense, ctx):
    """`ctx` with the changes defense.prepare returns for it (as fit applies them)."""
    (changes,) = defense.prepare([ctx])
    return ctx.with_changes(changes)


def record_steps(defense, sink):
    """Wrap defense.loss to record every Step it sees."""
    orig = defense.loss

    def spy(ctxs, step):
        sink.append(step)
        return orig(ctxs, step)

    defense.loss = spy
    return defense


# --- registry, parameters, checks --------------------------------------------------------------
def test_all_registered_with_spec_defaults():
    for name in NAMES:
        assert name in DEFENSES
        d = build_defense(name)
        assert d.name == name and d.params == type(d).spec.defaults()
        assert all(p.help for p in type(d).spec)
        assert type(d).batchable == (name not in ("dpsgd", "advreg", "dmp", "early_stopping"))
    for name, param in [("label_smoothing", "epsilon"), ("confidence_penalty", "beta"),
                        ("advreg", "alpha"), ("dpsgd", "noise_multiplier")]:
        lo, hi, scale = DEFENSES.get(name).spec[param].search
        assert lo <= DEFENSES.get(name).spec[param].default <= hi and scale in ("linear", "log")


@pytest.mark.parametrize("name,params", [
    ("label_smoothing", {"epsilon": 1.0}), ("label_smoothing", {"epsilon": -0.1}),
    ("label_smoothing", {"epsilon": "a"}), ("confidence_penalty", {"beta": -1}),
    ("confidence_penalty", {"beta": float("nan")}), ("early_stopping", {"stop_epoch": 0}),
    ("early_stopping", {"patience": 1.5}), ("early_stopping", {"val_fraction": 1.0}),
    ("advreg", {"alpha": -1}), ("advreg", {"k": 0}), ("advreg", {"attack_lr": 0}),
    ("advreg", {"ref_fraction": 0}), ("dmp", {"temperature": 0}), ("dmp", {"ref_size": 0}),
    ("dmp", {"ref_fraction": 1.5}), ("dpsgd", {"noise_multiplier": -1}),
    ("dpsgd", {"max_grad_norm": 0}), ("dpsgd", {"delta": 1}), ("dpsgd", {"sigma": 1}),
])
def test_bad_params_raise_crlerror(name, params):
    with pytest.raises(CRLError) as e:
        build_defense(name, params)
    msg = str(e.value)
    assert "\n" not in msg and f"{name}.{next(iter(params))}" in msg and "expected" in msg


class _Untrainable(nn.Module):
    """A model whose forward pass fails the test: check() must stop fit before it runs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        raise AssertionError("a model trained before the defense's check()")


@pytest.mark.parametrize("name,params,n,epochs,batch,match", [
    ("advreg", {"ref_fraction": 0.1}, 3, 3, 2, "advreg.ref_fraction = 0.1: holds out 0 of 3"),
    ("early_stopping", {"val_fraction": 0.95}, 10, 3, 2, "keeps at least 1"),
    ("early_stopping", {"stop_epoch": 9}, 100, 3, 32, "early_stopping.stop_epoch = 9"),
    ("dmp", {"ref_size": 99}, 100, 3, 32, "dmp.ref_size = 99: more than the 50"),
    ("dmp", {"ref_fraction": 0.01}, 20, 3, 4, "dmp.ref_fraction = 0.01: holds out 0 of 20"),
    ("dpsgd", {}, 20, 3, 32, "batch_size = 32 with 20 training samples"),
])
def test_check_errors_before_training(digits, members, name, params, n, epochs, batch, match):
    d = build_defense(name, params)
    with pytest.raises(CRLError, match=match) as e:
        d.check(recipe(epochs, batch), n)
    assert "\n" not in str(e.value)
    with pytest.raises(CRLError, match=match):
        fit(_Untrainable(), digits, members[0][:n], recipe(epochs, batch), build_defense(
            name, params), progress=False)


# --- label smoothing, confidence penalty --------------------------------------------------------
def test_label_smoothing_loss_matches_plain_torch(digits, members):
    torch.manual_seed(1)
    ctx = make_ctx(digits, members[0])
    logits = torch.randn(7, 10)
    step = make_step(ctx, members[0][:7], logits=logits)
    eps = 0.2
    target = torch.full((7, 10), eps / 10).scatter_(1, step.y[0, :, None], 1 - eps + eps / 10)
    expected = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    got = build_defense("label_smoothing", {"epsilon": eps}).loss([ctx], step)
    assert got.shape == (1,) and torch.allclose(got[0], expected, atol=1e-6)
    res, _ = run(digits, members[0], "label_smoothing", epochs=2)
    assert len(res.history) == 2 and math.isfinite(res.history[-1]["train_loss"])


def test_confidence_penalty_matches_plain_torch(digits, members):
    torch.manual_seed(2)
    ctx = make_ctx(digits, members[0])
    logits = torch.randn(5, 10)
    step = make_step(ctx, members[0][:5], logits=logits)
    p = torch.softmax(logits, 1)
    ent = -(p * p.log()).sum(1).mean()
    ce = F.cross_entropy(logits, step.y[0])
    d = build_defense("confidence_penalty", {"beta": 0.3})
    ctx = prepared(d, ctx)
    assert torch.allclose(d.loss([ctx], step), (ce - 0.3 * ent)[None], atol=1e-6)
    m = d.end_epoch([ctx], 1)[0].metrics
    assert m["entropy"] == pytest.approx(float(ent), abs=1e-5)
    assert m["l_ce"] == pytest.approx(float(ce), abs=1e-5)
    assert d.end_epoch([ctx], 2)[0].metrics == {}
    res, _ = run(digits, members[0], "confidence_penalty", epochs=2)
    assert {"entropy", "l_ce"} <= set(res.history[-1])


# --- membership ground truth of the held-out defenses -------------------------------------------
def _held_out(name, d):
    if name == "early_stopping":
        return d.val_idx.numpy()
    if name == "advreg":
        return d.ref_idx.numpy()
    return np.setdiff1d(d.ref_pool.numpy(), d.ref_idx.numpy()).tolist() + d.teacher_idx.tolist()


@pytest.mark.parametrize("name", HELD_OUT)
def test_train_idx_excludes_exactly_the_held_out_samples(digits, members, name):
    steps = []
    d = record_steps(build_defense(name, {"patience": 10} if name == "early_stopping" else None),
                     steps)
    res = fit(mlp(), digits, members[0], recipe(2), d, progress=False)
    trained, held = np.sort(res.train_idx), np.sort(np.asarray(_held_out(name, d)))
    assert held.size > 0 and np.intersect1d(trained, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([trained, held])), np.sort(members[0]))
    # exactly what the model trained on: every sample fit drew, and nothing else
    seen = np.unique(torch.cat([s.idx.reshape(-1) for s in steps]).numpy())
    assert np.array_equal(seen, trained)
    assert np.intersect1d(held, members[1]).size == 0        # non-members never drawn on


def test_held_out_splits_come_from_named_streams(digits, members):
    a = build_defense("advreg")
    (changes,) = a.prepare([make_ctx(digits, members[0])])
    b = build_defense("advreg")
    b.prepare([make_ctx(digits, members[0])])
    e = build_defense("early_stopping", {"val_fraction": 0.2})
    e.prepare([make_ctx(digits, members[0])])
    assert torch.equal(changes.train_idx, a.member_idx)      # returned, not written into ctx
    assert changes.model is changes.optimizer is changes.sampler is None
    assert torch.equal(a.ref_idx, b.ref_idx)                  # same seed, same split
    assert not torch.equal(a.ref_idx, e.val_idx)              # another name, another split
    assert all(torch.equal(p, q) for p, q in zip(a.attack.parameters(), b.attack.parameters()))


# --- early stopping ----------------------------------------------------------------------------
def test_early_stopping_at_stop_epoch(digits, members):
    res, d = run(digits, members[0], "early_stopping", {"stop_epoch": 2}, epochs=5)
    assert len(res.history) == 2
    assert np.array_equal(np.sort(res.train_idx), np.sort(members[0]))   # no data held out
    assert d.report()["stopped_epoch"] == 2 and d.report()["mode"] == "stop_epoch"


def test_early_stopping_by_patience_restores_best(digits, members, monkeypatch):
    d = build_defense("early_stopping", {"patience": 2, "val_fraction": 0.2})
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.1, 0.1])
    evaluated = []

    def fake_evaluate(model, data, idx, **kw):
        evaluated.append(np.asarray(idx).copy())
        return next(scripted), 0.25

    monkeypatch.setattr("crl.defenses.base.evaluate", fake_evaluate)
    states = []
    orig_end = d.end_epoch

    def spy(ctxs, epoch):
        states.append({k: v.clone() for k, v in ctxs[0].model.state_dict().items()})
        return orig_end(ctxs, epoch)

    monkeypatch.setattr(d, "end_epoch", spy)
    res = fit(mlp(), digits, members[0], recipe(6), d, progress=False)
    assert len(res.history) == 4                      # best at 2, no improvement at 3 and 4
    assert [r["val_loss"] for r in res.history] == [1.0, 0.5, 0.6, 0.7]
    assert all(r["val_acc"] == 0.25 for r in res.history)
    rep = d.report()
    assert rep["best_epoch"] == 2 and rep["stopped_epoch"] == 4
    for k, v in res.model.state_dict().items():       # weights of epoch 2 restored
        assert torch.equal(v, states[1][k])
    val = d.val_idx.numpy()
    assert all(np.array_equal(idx, val) for idx in evaluated)   # validated on its split only
    assert rep["n_val"] == 20 and rep["n_train"] == 80


def test_early_stopping_real_validation_runs(digits, members):
    from crl.models.evaluation import evaluate

    res, d = run(digits, members[0], "early_stopping", {"patience": 1}, epochs=4)
    assert "val_loss" in res.history[0] and 1 <= len(res.history) <= 4
    best = d.report()["best_epoch"]
    assert best >= 1 and res.history[best - 1]["val_loss"] == d.report()["best_val_loss"]
    # the restored model is the best epoch's: its validation loss is the one logged then
    assert evaluate(res.model, digits, d.val_idx)[0] == pytest.approx(d.best_loss, abs=1e-6)


# --- AdvReg ------------------------------------------------------------------------------------
def test_advreg_inference_model_learns_and_all_params_change(digits, members):
    # Random labels make the classifier memorise its members: an easy target for the attack.
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (len(digits),), generator=gen)
    noisy = ImageData("digits-random", digits.x, labels, 10, digits.mean, digits.std)
    d = build_defense("advreg", {"alpha": 0.0, "k": 2, "attack_lr": 2e-3, "ref_fraction": 0.3})
    before = {}
    orig_prepare = d.prepare

    def spy(ctxs):
        changes = orig_prepare(ctxs)
        before.update({n: p.detach().clone() for n, p in d.attack.named_parameters()})
        return changes

    d.prepare = spy
    res = fit(mlp(), noisy, members[0], recipe(30, lr=0.1), d, progress=False)
    after = dict(d.attack.named_parameters())
    assert len(before) == len(after) == 18
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert unchanged == []
    # fresh measurement: members vs reference on the final model
    ref, mem = d.ref_idx, torch.as_tensor(res.train_idx)
    with torch.no_grad():
        res.model.eval()

        def h(idx):
            x = (noisy.x[idx].float() / 255 - digits.mean[0]) / digits.std[0]
            return d.attack(torch.softmax(res.model(x), 1), noisy.y[idx])

        acc = 0.5 * (float((h(mem) > 0).float().mean()) + float((h(ref) <= 0).float().mean()))
    assert acc > 0.7                                  # 0.85 with torch 2.14 on CPU
    assert d.report()["n_reference"] == 30 and d.report()["n_train"] == 70


def test_advreg_loss_trains_attack_first_then_is_ce_plus_alpha_member_gain(digits, members):
    d = build_defense("advreg", {"alpha": 2.0, "k": 3})
    ctx = prepared(d, make_ctx(digits, members[0]))
    step = make_step(ctx, ctx.train_idx[:8])
    before = [p.detach().clone() for p in d.attack.parameters()]
    loss = d.loss([ctx], step)
    assert all(not torch.equal(a, b) for a, b in zip(before, d.attack.parameters()))
    logits, y = step.logits[0], step.y[0]
    with torch.no_grad():            # the member term uses the inference model after its steps
        z = d.attack(torch.softmax(logits, 1), y)
    expected = F.cross_entropy(logits, y) + 2.0 * F.logsigmoid(z).mean()
    assert torch.allclose(loss, expected[None], atol=1e-6)
    assert ctx.model.training                         # inner steps left the model's mode alone
    for p in d.attack.parameters():
        p.grad = None
    loss.sum().backward()
    assert all(p.grad is None for p in d.attack.parameters())   # classifier step only
    m = d.end_epoch([ctx], 1)[0].metrics
    assert {"attack_acc", "attack_gain", "l_ce", "member_log_h"} <= set(m)
    state = d.state_dict()
    assert {"attack", "attack_opt", "gen"} <= set(state) and state["attack_opt"]["state"]


# --- DMP ---------------------------------------------------------------------------------------
def test_dmp_student_trains_only_on_low_entropy_reference(digits, members):
    steps = []
    d = record_steps(build_defense("dmp", {"ref_fraction": 0.5, "ref_size": 30,
                                           "temperature": 2.0}), steps)
    res = fit(mlp(), digits, members[0], recipe(3), d, progress=False)
    ref, teach = d.ref_idx.numpy(), d.teacher_idx.numpy()
    assert np.array_equal(np.sort(res.train_idx), ref) and ref.size == 30
    assert np.intersect1d(ref, teach).size == 0
    assert np.isin(ref, members[0]).all() and np.isin(teach, members[0]).all()
    # lowest teacher entropy kept
    chosen = np.isin(d.ref_pool.numpy(), ref)
    assert d.ref_entropy[chosen].max() <= d.ref_entropy[~chosen].min()
    # every training batch the student saw holds reference samples only
    assert all(np.isin(s.idx.numpy(), ref).all() for s in steps)
    # the loss is KL to the teacher's temperature-softened posteriors; hard labels are ignored
    ctx = make_ctx(digits, members[0])
    x = steps[0].x[0]
    logits = res.model(x)
    fake = Step(x=x[None], y=torch.zeros(1, len(x), dtype=torch.long), idx=steps[0].idx,
                logits=logits[None], features=None, epoch=1, step=1)
    got = d.loss([ctx], fake)
    q = torch.softmax(d.teacher(x) / 2.0, 1)
    expected = (q * (q.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(got, expected[None], atol=1e-5)
    rep = d.report()
    assert rep["n_teacher"] == 50 and rep["n_student"] == 30


def test_dmp_teacher_only_group_is_disjoint_from_the_student(digits, members):
    res, d = run(digits, members[0], "dmp", epochs=2)
    groups = d.evaluation_groups()
    assert set(groups) == {"teacher_only"} and set(res.groups) == {"teacher_only"}
    teacher_only = groups["teacher_only"]
    assert teacher_only.size == 50 and np.intersect1d(teacher_only, res.train_idx).size == 0
    assert np.isin(teacher_only, members[0]).all()
    assert np.array_equal(np.sort(teacher_only), np.sort(d.teacher_idx.numpy()))


def test_dmp_errors(digits, members):
    with pytest.raises(CRLError, match="no trainer"):
        build_defense("dmp").prepare([make_ctx(digits, members[0])])
    ctx = make_ctx(digits, members[0])
    with pytest.raises(CRLError, match="prepare"):
        build_defense("dmp").loss([ctx], make_step(ctx, members[0][:2]))
    with pytest.raises(CRLError, match="one model at a time, got 2"):
        build_defense("dmp").prepare([ctx, ctx])


# --- DP-SGD ------------------------------------------------------------------------------------
def test_dpsgd_epsilon_grows_and_model_unwrapped(digits, members):
    res1, d1 = run(digits, members[0], "dpsgd", epochs=1)
    res2, d2 = run(digits, members[0], "dpsgd", epochs=3)
    e1, e2 = d1.report()["epsilon"], d2.report()["epsilon"]
    assert 0 < e1 < e2 and d2.report()["batches_drawn"] == 3 * d1.report()["batches_drawn"] == 12
    assert e2 == d2.epsilon(12) and d1.epsilon(12) == e2
    eps = [d1.epsilon(s) for s in (1, 10, 100, 1000)]
    assert all(a < b for a, b in itertools.pairwise(eps))
    rep = d2.report()
    assert rep["delta"] == 1e-5 and rep["sampling"] == "poisson" and rep["accountant"] == "rdp"
    assert rep["sample_rate"] == pytest.approx(32 / 100) and rep["model_transforms"] == []
    for res in (res1, res2):
        assert type(res.model) is nn.Sequential
        assert not any(k.startswith("_module") for k in res.model.state_dict())
        assert all(not hasattr(p, "grad_sample") for p in res.model.parameters())
    from crl.defenses.dpsgd import rdp_epsilon

    assert rdp_epsilon(0.0, 0.3, 10, 1e-5) == math.inf and rdp_epsilon(1.0, 0.3, 0, 1e-5) == 0
    assert build_defense("dpsgd", {"noise_multiplier": 0.0}).params["noise_multiplier"] == 0.0


def test_dpsgd_poisson_batches_vary_and_epsilon_matches_opacus(digits, members):
    from opacus.accountants import RDPAccountant

    n, batch, epochs = 20, 2, 3
    drawn, steps = [], []
    d = record_steps(build_defense("dpsgd", {"noise_multiplier": 1.3}), steps)
    orig_prepare = d.prepare

    def spy(ctxs):
        (changes,) = orig_prepare(ctxs)
        assert isinstance(changes.sampler, PoissonBatches) and changes.sampler is d.sampler
        inner = changes.sampler

        class Recorder:
            def batches(self, idx, gen):
                for b in inner.batches(idx, gen):
                    drawn.append(b.numel())
                    yield b

        return [replace(changes, sampler=Recorder())]

    d.prepare = spy
    fit(mlp(), digits, members[0][:n], recipe(epochs, batch), d, progress=False)
    rep = d.report()
    assert rep["sample_rate"] == pytest.approx(batch / n)
    assert len(drawn) == rep["batches_drawn"] == epochs * math.ceil(n / batch)
    assert len(set(drawn)) >= 3                                # batch sizes vary
    empty = drawn.count(0)
    assert empty > 0 and rep["steps"] == len(steps) == len(drawn) - empty   # empty: skipped
    acc = RDPAccountant()
    for _ in range(len(drawn)):                                # every draw, empty ones too
        acc.step(noise_multiplier=1.3, sample_rate=batch / n)
    assert rep["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    bound = len(drawn) * (1 - batch / n) ** (n - 1)       # > 1 here: tiny data, no guarantee
    assert rep["empty_batch_bound"] == min(1.0, bound) == 1.0


def test_dpsgd_averages_over_the_expected_batch_size(digits, members):
    """Poisson batches vary in size: the update is the sum of per-sample gradients divided by
    the expected batch size (no noise and no clipping here, to compare with plain torch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    plain = copy.deepcopy(model)
    d = build_defense("dpsgd", {"noise_multiplier": 0.0, "max_grad_norm": 1e6})
    ctx = prepared(d, make_ctx(digits, members[0], model=model, batch=32))
    step = make_step(ctx, members[0][:8])
    ctx.optimizer.zero_grad(set_to_none=True)
    d.loss([ctx], step).sum().backward()
    ctx.optimizer.step()
    F.cross_entropy(plain(step.x[0]), step.y[0]).backward()
    for p, q in zip(ctx.model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad * 8 / 32)


def test_dpsgd_batchnorm_model_is_fixed_steps_and_unwraps(digits, members):
    from crl.models.features import FeatureTap

    d = build_defense("dpsgd")
    plain = make_ctx(digits, members[0], model=conv_bn())
    ctx = prepared(d, plain)
    assert plain.model is not ctx.model and plain.optimizer is not ctx.optimizer
    assert ctx.sampler is d.sampler and plain.sampler is not d.sampler
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ctx.model.modules())
    assert {id(p) for p in ctx.model.parameters()} == \
        {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    tap = FeatureTap(ctx.model)
    step = make_step(ctx, members[0][:8])
    before = [p.detach().clone() for p in ctx.model.parameters()]
    ctx.optimizer.zero_grad(set_to_none=True)
    d.loss([ctx], step).sum().backward()
    assert tap.pop().shape == (8, 16)
    ctx.optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
    tap.remove()
    ctx = ctx.with_changes(d.finish(ctx))
    assert type(ctx.model) is nn.Sequential           # unwrapped, GroupNorm in place of BatchNorm
    assert any(isinstance(m, nn.GroupNorm) for m in ctx.model.modules())
    assert d.report()["model_transforms"] == ["opacus_fix"] and d.report()["steps"] == 1


def test_dpsgd_batchnorm_model_reloads_through_its_recorded_transforms(digits, members):
    from crl.models.transforms import apply_transforms

    res, d = run(digits, members[0][:40], "dpsgd", epochs=1, batch=8, model=conv_bn())
    transforms = res.report["model_transforms"]
    assert transforms == ["opacus_fix"] and d.report()["steps"] > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())
    assert not any(k.startswith("_module") for k in res.model.state_dict())
    rebuilt = apply_transforms(conv_bn(seed=3), transforms)
    rebuilt.load_state_dict(res.model.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), res.model.eval()(x))


def test_dpsgd_without_opacus_raises(digits, members, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(CRLError, match=r"dpsgd needs opacus: pip install 'crl\[dp\]'"):
        build_defense("dpsgd").prepare([make_ctx(digits, members[0])])


# --- resume, audit -----------------------------------------------------------------------------
class _Stop(Exception):
    pass


@pytest.mark.parametrize("name,params", [
    ("advreg", {"k": 2}), ("early_stopping", {"patience": 10}), ("dpsgd", {}),
    ("dmp", {"ref_size": 20}),
])
def test_resume_is_exact(digits, members, tmp_path, name, params):
    idx = members[0][:64]
    full, _ = run(digits, idx, name, params, epochs=4)
    d = build_defense(name, params)
    orig = d.loss

    def crash(ctx, step):
        if step.epoch == 3:
            raise _Stop
        return orig(ctx, step)

    d.loss = crash
    with pytest.raises(_Stop):
        fit(mlp(), digits, idx, recipe(4), d, run_dir=tmp_path, progress=False)
    resumed = fit(mlp(seed=5), digits, idx, recipe(4), build_defense(name, params),
                  run_dir=tmp_path, resume=True, progress=False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert full.report == resumed.report


def test_tiny_audit_rows_carry_reports(tmp_path):
    from crl.commands.audit import audit
    from crl.config import AuditConfig

    cfg = AuditConfig(dataset="digits", defenses=NAMES, attacks=["loss"], seeds=[0], shadows=0,
                      epochs=2, subset=200, out=str(tmp_path / "out"), progress=False,
                      cache=False, set={"early_stopping": {"stop_epoch": 1}})
    rows = audit(cfg, echo=lambda s: None)["rows"]
    by = {r["defense"]: r for r in rows}
    assert set(by) == set(NAMES)
    assert by["dpsgd"]["defense_report"]["epsilon"] > 0
    assert by["dpsgd"]["params"]["noise_multiplier"] == 1.0
    assert by["advreg"]["defense_report"]["n_reference"] > 0
    assert by["dmp"]["defense_report"]["n_student"] > 0
    assert by["early_stopping"]["defense_report"]["stopped_epoch"] == 1
    # membership ground truth: held-out samples are not members; DMP's teacher half is a group
    assert by["advreg"]["n_members"] == by["advreg"]["defense_report"]["n_train"]
    assert by["advreg"]["n_held_out"] == by["advreg"]["defense_report"]["n_reference"]
    assert by["dmp"]["n_members"] == by["dmp"]["defense_report"]["n_student"]
    assert "teacher_only" in by["dmp"]["attacks"]["loss"]
