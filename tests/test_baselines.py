"""Baseline defenses: label_smoothing, confidence_penalty, early_stopping, advreg, dmp, dpsgd.

Tiny CPU fits on digits (mlp, a few epochs); each test checks the defense does what it claims.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import crl.defenses  # noqa: F401  (registers every defense)
from crl.data.splits import make_pool_split
from crl.data.types import ImageData
from crl.defenses.base import FitContext, build_defense
from crl.errors import CRLError
from crl.models import create_model
from crl.registry import DEFENSES
from crl.train import Recipe, fit

NAMES = ["label_smoothing", "confidence_penalty", "early_stopping", "advreg", "dmp", "dpsgd"]


@pytest.fixture(scope="module")
def members(digits):
    """The digits default's 100 target members (400-sample subset) and 100 non-members."""
    split = make_pool_split(digits.y.numpy(), seed=0, subset=400)
    return split.target_members, split.target_nonmembers


def mlp(seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", 1, 8, 10)


def recipe(epochs, batch=32, lr=0.05, seed=0):
    return Recipe(epochs=epochs, batch_size=batch, lr=lr, seed=seed, device="cpu")


def run(data, idx, name, params=None, epochs=3, model=None, **kw):
    defense = build_defense(name, params)
    res = fit(model or mlp(), data, idx, recipe(epochs), defense, progress=False, **kw)
    return res, defense


def make_ctx(data, idx, model=None, epochs=3, batch=32):
    model = model or mlp()
    rec = recipe(epochs, batch)
    return FitContext(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        x=data.x, y=data.y, train_idx=torch.as_tensor(idx), num_classes=data.num_classes,
        feat_dim=256, device=torch.device("cpu"), epochs=epochs, batch_size=batch, seed=0,
        mean=data.mean, std=data.std, generator=torch.Generator().manual_seed(0), recipe=rec)


# --- registry, parameters --------------------------------------------------------------------
def test_all_registered_with_defaults():
    for name in NAMES:
        assert name in DEFENSES
        d = build_defense(name)
        assert d.name == name and set(d.params) == set(type(d).defaults)


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
    assert "\n" not in msg and name in msg and next(iter(params)) in msg


def test_fractions_that_leave_nothing_raise(digits, members):
    ctx = make_ctx(digits, members[0][:3])
    with pytest.raises(CRLError, match="ref_fraction"):
        build_defense("advreg", {"ref_fraction": 0.1}).prepare(ctx)   # rounds to 0 held out
    with pytest.raises(CRLError, match="stop_epoch=9"):
        build_defense("early_stopping", {"stop_epoch": 9}).prepare(make_ctx(digits, members[0]))


# --- label smoothing, confidence penalty --------------------------------------------------------
def test_label_smoothing_loss_matches_plain_torch(digits, members):
    torch.manual_seed(1)
    logits, y = torch.randn(7, 10), torch.randint(0, 10, (7,))
    eps = 0.2
    target = torch.full((7, 10), eps / 10).scatter_(1, y[:, None], 1 - eps + eps / 10)
    expected = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
    got = build_defense("label_smoothing", {"epsilon": eps}).loss(logits, None, y, 1)
    assert torch.allclose(got, expected, atol=1e-6)
    res, _ = run(digits, members[0], "label_smoothing", epochs=2)
    assert len(res.history) == 2 and math.isfinite(res.history[-1]["train_loss"])


def test_confidence_penalty_matches_plain_torch(digits, members):
    torch.manual_seed(2)
    logits, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    p = torch.softmax(logits, 1)
    ent = -(p * p.log()).sum(1).mean()
    ce = F.cross_entropy(logits, y)
    d = build_defense("confidence_penalty", {"beta": 0.3})
    assert torch.allclose(d.loss(logits, None, y, 1), ce - 0.3 * ent, atol=1e-6)
    m = d.extra_metrics()
    assert m["entropy"] == pytest.approx(float(ent), abs=1e-5) and d.extra_metrics() == {}
    res, _ = run(digits, members[0], "confidence_penalty", epochs=2)
    assert {"entropy", "l_ce"} <= set(res.history[-1])


# --- early stopping ----------------------------------------------------------------------------
def test_early_stopping_at_stop_epoch(digits, members):
    res, d = run(digits, members[0], "early_stopping", {"stop_epoch": 2}, epochs=5)
    assert len(res.history) == 2
    assert np.array_equal(np.sort(res.train_idx), np.sort(members[0]))   # no data held out
    assert d.report()["stopped_epoch"] == 2 and d.report()["mode"] == "stop_epoch"


def test_early_stopping_by_patience_restores_best(digits, members, monkeypatch):
    d = build_defense("early_stopping", {"patience": 2, "val_fraction": 0.2})
    scripted = iter([1.0, 0.5, 0.6, 0.7, 0.1, 0.1])
    monkeypatch.setattr(d, "validation", lambda ctx: (next(scripted), 0.0))
    states = []
    orig_end = d.end_epoch

    def spy(ctx, epoch):
        states.append({k: v.clone() for k, v in ctx.model.state_dict().items()})
        return orig_end(ctx, epoch)

    monkeypatch.setattr(d, "end_epoch", spy)
    res = fit(mlp(), digits, members[0], recipe(6), d, progress=False)
    assert len(res.history) == 4                      # best at 2, no improvement at 3 and 4
    rep = d.report()
    assert rep["best_epoch"] == 2 and rep["stopped_epoch"] == 4
    for k, v in res.model.state_dict().items():       # weights of epoch 2 restored
        assert torch.equal(v, states[1][k])
    # the validation split: drawn only from the members, disjoint from what the model trained on
    val, trained = d.val_idx.numpy(), res.train_idx
    assert np.intersect1d(val, trained).size == 0
    assert np.array_equal(np.sort(np.concatenate([val, trained])), np.sort(members[0]))
    assert np.intersect1d(val, members[1]).size == 0
    assert rep["n_val"] == 20 and rep["n_train"] == 80


def test_early_stopping_real_validation_runs(digits, members):
    res, d = run(digits, members[0], "early_stopping", {"patience": 1}, epochs=4)
    assert "val_loss" in res.history[0] and 1 <= len(res.history) <= 4
    assert d.report()["best_epoch"] >= 1


# --- AdvReg ------------------------------------------------------------------------------------
def test_advreg_inference_model_learns_and_all_params_change(digits, members):
    # Random labels make the classifier memorise its members: an easy target for the attack.
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (len(digits),), generator=gen)
    noisy = ImageData("digits-random", digits.x, labels, 10, digits.mean, digits.std)
    d = build_defense("advreg", {"alpha": 0.0, "k": 2, "attack_lr": 2e-3, "ref_fraction": 0.3})
    before = {}
    orig_prepare = d.prepare

    def spy(ctx):
        orig_prepare(ctx)
        before.update({n: p.detach().clone() for n, p in d.attack.named_parameters()})

    d.prepare = spy
    res = fit(mlp(), noisy, members[0], recipe(30, lr=0.1), d, progress=False)
    after = dict(d.attack.named_parameters())
    assert len(before) == len(after) == 18
    unchanged = [n for n in before if torch.equal(before[n], after[n].detach())]
    assert unchanged == []
    # fresh measurement: members vs reference on the final model
    ref, mem = d.ref_idx, torch.as_tensor(res.train_idx)
    assert np.intersect1d(ref.numpy(), res.train_idx).size == 0
    assert set(ref.tolist()) | set(res.train_idx.tolist()) == set(members[0].tolist())
    with torch.no_grad():
        res.model.eval()

        def h(idx):
            x = (noisy.x[idx].float() / 255 - digits.mean[0]) / digits.std[0]
            return d.attack(torch.softmax(res.model(x), 1), noisy.y[idx])

        acc = 0.5 * (float((h(mem) > 0).float().mean()) + float((h(ref) <= 0).float().mean()))
    assert acc > 0.7                                  # 0.85 with torch 2.14 on CPU
    assert d.report()["n_reference"] == 30 and d.report()["n_train"] == 70


def test_advreg_loss_is_ce_plus_alpha_member_gain(digits, members):
    d = build_defense("advreg", {"alpha": 2.0})
    ctx = make_ctx(digits, members[0])
    d.prepare(ctx)
    idx = ctx.train_idx[:8]
    x, y = ctx.batch_inputs(idx), ctx.y[idx]
    d.before_step(ctx, x, y, 1)
    logits = ctx.model(x)
    loss = d.loss(logits, None, y, 1)
    with torch.no_grad():
        z = d.attack(torch.softmax(logits, 1), y)
    expected = F.cross_entropy(logits, y) + 2.0 * F.logsigmoid(z).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    for p in d.attack.parameters():
        p.grad = None
    loss.backward()
    assert all(p.grad is None for p in d.attack.parameters())   # classifier step only
    assert {"attack_acc", "attack_gain", "l_ce", "member_log_h"} <= set(d.extra_metrics())
    state = d.state_dict()
    assert {"attack", "attack_opt", "gen"} <= set(state) and state["attack_opt"]["state"]


# --- DMP ---------------------------------------------------------------------------------------
def test_dmp_student_trains_only_on_low_entropy_reference(digits, members):
    d = build_defense("dmp", {"ref_fraction": 0.5, "ref_size": 30, "temperature": 2.0})
    seen = []
    orig = d.before_step

    def spy(ctx, x, y, epoch):
        seen.append(x.clone())
        orig(ctx, x, y, epoch)

    d.before_step = spy
    res = fit(mlp(), digits, members[0], recipe(3), d, progress=False)
    ref, teach = d.ref_idx.numpy(), d.teacher_idx.numpy()
    assert np.array_equal(np.sort(res.train_idx), ref) and ref.size == 30
    assert np.intersect1d(ref, teach).size == 0
    assert np.isin(ref, members[0]).all() and np.isin(teach, members[0]).all()
    # lowest teacher entropy kept
    chosen = np.isin(d.ref_pool.numpy(), ref)
    assert d.ref_entropy[chosen].max() <= d.ref_entropy[~chosen].min()
    # every training input the student saw is a reference sample
    ref_x = ((digits.x[d.ref_idx].float() / 255 - digits.mean[0]) / digits.std[0]).flatten(1)
    for x in seen:
        gap = (x.flatten(1)[:, None] - ref_x[None]).abs().amax(-1)   # [batch, n_ref]
        assert gap.min(1).values.max() < 1e-5
    # the loss is KL to the teacher's temperature-softened posteriors; hard labels are ignored
    x = seen[0]
    logits = res.model(x)
    d.before_step = orig
    ctx = make_ctx(digits, members[0])
    d.before_step(ctx, x, None, 1)
    got = d.loss(logits, None, torch.zeros(len(x), dtype=torch.long), 1)
    q = torch.softmax(d.teacher(x) / 2.0, 1)
    expected = (q * (q.log() - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(got, expected, atol=1e-5)
    rep = d.report()
    assert rep["n_teacher"] == 50 and rep["n_student"] == 30


def test_dmp_errors(digits, members):
    ctx = make_ctx(digits, members[0])
    ctx.recipe = None
    with pytest.raises(CRLError, match="recipe"):
        build_defense("dmp").prepare(ctx)
    with pytest.raises(CRLError, match="ref_size=99"):
        build_defense("dmp", {"ref_size": 99}).prepare(make_ctx(digits, members[0]))
    with pytest.raises(CRLError, match="before_step"):
        build_defense("dmp").loss(torch.zeros(2, 10), None, torch.zeros(2, dtype=torch.long), 1)


# --- DP-SGD ------------------------------------------------------------------------------------
def test_dpsgd_epsilon_grows_and_model_unwrapped(digits, members):
    res1, d1 = run(digits, members[0], "dpsgd", epochs=1)
    res2, d2 = run(digits, members[0], "dpsgd", epochs=3)
    e1, e2 = d1.report()["epsilon"], d2.report()["epsilon"]
    assert 0 < e1 < e2 and d2.report()["steps"] == 3 * d1.report()["steps"] == 12
    eps = [d1.epsilon(s) for s in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    rep = d2.report()
    assert rep["delta"] == 1e-5 and "not Poisson" in rep["sampling"]
    assert rep["sample_rate"] == pytest.approx(32 / 100)
    for res in (res1, res2):
        assert type(res.model) is nn.Sequential
        assert not any(k.startswith("_module") for k in res.model.state_dict())
        assert all(not hasattr(p, "grad_sample") for p in res.model.parameters())
    from crl.defenses.dpsgd import rdp_epsilon

    assert rdp_epsilon(0.0, 0.3, 10, 1e-5) == math.inf and rdp_epsilon(1.0, 0.3, 0, 1e-5) == 0


def test_dpsgd_batchnorm_and_feature_tap(digits, members):
    from crl.models.features import FeatureTap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(4 * 64, 16), nn.ReLU(inplace=True),
                          nn.Linear(16, 10))
    d = build_defense("dpsgd")
    ctx = make_ctx(digits, members[0], model=model)
    d.prepare(ctx)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ctx.model.modules())
    assert {id(p) for p in ctx.model.parameters()} == \
        {id(p) for g in ctx.optimizer.param_groups for p in g["params"]}
    tap = FeatureTap(ctx.model)
    x, y = ctx.batch_inputs(members[0][:8]), ctx.y[members[0][:8]]
    before = [p.detach().clone() for p in ctx.model.parameters()]
    ctx.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(ctx.model(x), y).backward()
    assert tap.pop().shape == (8, 16)
    ctx.optimizer.step()
    d.after_step(ctx, 1)
    assert any(not torch.equal(a, b) for a, b in zip(before, ctx.model.parameters()))
    tap.remove()
    d.finish(ctx)
    assert type(ctx.model) is nn.Sequential           # unwrapped, GroupNorm in place of BatchNorm
    assert any(isinstance(m, nn.GroupNorm) for m in ctx.model.modules())
    assert d.report()["opacus_fixed_modules"] is True and d.report()["steps"] == 1
    res, _ = run(digits, members[0][:40], "dpsgd", epochs=1, model=nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 10)))
    assert not any(k.startswith("_module") for k in res.model.state_dict())


def test_dpsgd_without_opacus_raises(digits, members, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    with pytest.raises(CRLError, match=r"dpsgd needs opacus: pip install 'crl\[dp\]'"):
        build_defense("dpsgd").prepare(make_ctx(digits, members[0]))


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
    orig = d.before_step

    def crash(ctx, x, y, epoch):
        if epoch == 3:
            raise _Stop
        orig(ctx, x, y, epoch)

    d.before_step = crash
    with pytest.raises(_Stop):
        fit(mlp(), digits, idx, recipe(4), d, run_dir=tmp_path, progress=False)
    resumed = fit(mlp(seed=5), digits, idx, recipe(4), build_defense(name, params),
                  run_dir=tmp_path, resume=True, progress=False)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_tiny_audit_rows_carry_reports(tmp_path):
    from crl.audit import run_audit
    from crl.config import AuditConfig

    cfg = AuditConfig(dataset="digits", defenses=NAMES, attacks=["loss"], seeds=[0], shadows=0,
                      epochs=2, subset=200, out=str(tmp_path / "out"), progress=False,
                      cache=False, set={"early_stopping": {"stop_epoch": 1}})
    rows = run_audit(cfg, echo=lambda s: None)["rows"]
    by = {r["defense"]: r for r in rows}
    assert set(by) == set(NAMES)
    assert by["dpsgd"]["defense_report"]["epsilon"] > 0
    assert by["dpsgd"]["params"]["noise_multiplier"] == 1.0
    assert by["advreg"]["defense_report"]["n_reference"] > 0
    assert by["dmp"]["defense_report"]["n_student"] > 0
    assert by["early_stopping"]["defense_report"]["stopped_epoch"] == 1


def test_dpsgd_batchnorm_model_saves_and_loads(tmp_path):
    """A BatchNorm model trained with DP-SGD (GroupNorm after Opacus's fix) reloads exactly."""
    import crl
    from crl.data.datasets import load_dataset
    from crl.defenses.base import build_defense
    from crl.models import create_model
    from crl.train import Recipe, fit, save_model

    data = load_dataset("digits")
    torch.manual_seed(0)
    res = fit(create_model("vgg11_bn", 1, 8, 10), data, torch.arange(64),
              Recipe(epochs=1, batch_size=32, device="cpu"), build_defense("dpsgd"),
              progress=False)
    assert res.defense.report()["opacus_fixed_modules"] is True
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in res.model.modules())
    path = tmp_path / "dp.pt"
    save_model(path, res.model, arch="vgg11_bn", in_channels=1, image_size=8, num_classes=10,
               mean=data.mean, std=data.std, opacus_fixed=True)
    loaded = crl.load_model(path)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), res.model.eval()(x))
