"""The crl, imprelaxloss, rcl and relaxloss defenses on a tiny model and FitContext."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import crl.defenses.crl  # noqa: F401  (registers crl, imprelaxloss, rcl)
import crl.defenses.relaxloss  # noqa: F401  (registers relaxloss)
from crl.defenses.base import FitContext, build_defense
from crl.errors import CRLError
from crl.registry import DEFENSES

NAMES = ["crl", "imprelaxloss", "rcl", "relaxloss"]
N, IN, HID, K = 12, 8, 6, 3


def make_ctx(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, K))
    return FitContext(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        x=torch.zeros(N, 1, 1, IN, dtype=torch.uint8), y=torch.arange(N) % K,
        train_idx=torch.arange(N), num_classes=K, feat_dim=HID, device=torch.device("cpu"),
        epochs=2, batch_size=4, seed=seed, mean=(0.0,), std=(1.0,))


def step(defense, ctx, epoch, seed=0):
    """One fit-like training step; returns the loss value."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, IN, generator=gen)
    y = torch.tensor([0, 1, 2, 1])
    feats = ctx.model[:2](x)
    logits = ctx.model[2](feats)
    loss = defense.loss(logits, feats if defense.needs_features else None, y, epoch)
    opts = [ctx.optimizer, *defense.optimizers()]
    for opt in opts:
        opt.zero_grad()
    loss.backward()
    for opt in opts:
        opt.step()
    return loss.detach()


@pytest.mark.parametrize("name", NAMES)
def test_builds_prepares_and_trains(name):
    assert name in DEFENSES
    defense = build_defense(name)
    ctx = make_ctx()
    defense.prepare(ctx)
    for epoch in (1, 2):
        assert math.isfinite(float(step(defense, ctx, epoch)))
    metrics = defense.extra_metrics()
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert defense.extra_metrics() == {}                 # reset by the call
    assert defense.report() == {}


def test_params_and_fixed_values():
    assert build_defense("crl").params == {
        "alpha_rce": 0.5, "alpha_rcl": 14.0, "tau_rce": 0.2, "tau_rcl": 0.1, "lam": 0.1,
        "upper": 1.0, "detach_targets": False, "center_update": "paper"}
    assert build_defense("imprelaxloss").params["lam"] == 0.0
    rcl = build_defense("rcl", {"lam": 0.5})
    assert (rcl.params["tau_rce"], rcl.params["tau_rcl"], rcl.params["lam"]) == (0.0, 0.0, 0.5)
    assert build_defense("relaxloss").params == {"alpha": 0.5, "upper": 1.0}
    assert build_defense("crl").needs_features and build_defense("rcl").needs_features
    assert not build_defense("relaxloss").needs_features


@pytest.mark.parametrize("name,params", [
    ("imprelaxloss", {"lam": 0.1}), ("rcl", {"tau_rce": 0.1}), ("rcl", {"tau_rcl": 0.0})])
def test_fixed_param_raises(name, params):
    with pytest.raises(CRLError, match="fixed"):
        build_defense(name, params)


@pytest.mark.parametrize("name,params", [
    ("crl", {"beta": 1}), ("crl", {"lam": -0.1}), ("crl", {"center_update": "x"}),
    ("relaxloss", {"alpha": -1}), ("relaxloss", {"lam": 0.1})])
def test_bad_params_raise(name, params):
    with pytest.raises(CRLError):
        build_defense(name, params)


def test_loss_before_prepare_raises():
    with pytest.raises(CRLError, match="prepare"):
        build_defense("crl").loss(torch.zeros(2, K), torch.zeros(2, HID), torch.zeros(2).long(), 1)


def test_centers_seeded_from_ctx_and_optimizer_is_the_centers():
    a, b, c = (build_defense("crl") for _ in range(3))
    a.prepare(make_ctx(seed=0))
    b.prepare(make_ctx(seed=0))
    c.prepare(make_ctx(seed=1))
    assert torch.equal(a.crl_loss.centers, b.crl_loss.centers)
    assert not torch.equal(a.crl_loss.centers, c.crl_loss.centers)
    (opt,) = a.optimizers()
    assert opt.param_groups[0]["params"][0] is a.crl_loss.centers
    assert opt.param_groups[0]["lr"] == 0.001


def test_imprelaxloss_without_features():
    defense = build_defense("imprelaxloss")
    ctx = make_ctx()
    ctx.feat_dim = None
    defense.prepare(ctx)
    assert defense.optimizers() == []
    step(defense, ctx, 1)
    metrics = defense.extra_metrics()
    assert "l_ct" not in metrics and "l_rce" in metrics and "frac_rce_fit" in metrics
    assert defense.state_dict()["centers"] is None


@pytest.mark.parametrize("name", ["crl", "rcl", "relaxloss"])
@pytest.mark.parametrize("center_update", ["paper", "authors"])
def test_state_dict_round_trip_resumes_exactly(name, center_update):
    params = {} if name == "relaxloss" else {"center_update": center_update}
    ctx_a, ctx_b = make_ctx(seed=0), make_ctx(seed=0)
    a = build_defense(name, params)
    a.prepare(ctx_a)
    step(a, ctx_a, 1, seed=1)
    state = a.state_dict()
    model_state = {k: v.clone() for k, v in ctx_a.model.state_dict().items()}
    opt_state = ctx_a.optimizer.state_dict()
    b = build_defense(name, params)
    b.load_state_dict(state)                       # before prepare: applied by prepare
    ctx_b.seed = 5                                 # different init, overwritten by the state
    b.prepare(ctx_b)
    ctx_b.model.load_state_dict(model_state)
    ctx_b.optimizer.load_state_dict(opt_state)
    for epoch in (2, 3):
        la, lb = step(a, ctx_a, epoch, seed=epoch), step(b, ctx_b, epoch, seed=epoch)
        assert torch.equal(la, lb)
    if name != "relaxloss":
        assert torch.equal(a.crl_loss.centers, b.crl_loss.centers)
        assert not torch.equal(a.crl_loss.centers, state["centers"])     # centers moved
        # load after prepare works too
        c = build_defense(name, params)
        c.prepare(make_ctx(seed=9))
        c.load_state_dict(a.state_dict())
        assert torch.equal(c.crl_loss.centers, a.crl_loss.centers)


def test_extra_metrics_are_epoch_means():
    defense = build_defense("crl", {"alpha_rce": 1e3, "alpha_rcl": 0.0})
    ctx = make_ctx()
    defense.prepare(ctx)
    seen = []
    for s in range(3):
        step(defense, ctx, 1, seed=s)
        seen.append(dict(defense.crl_loss.last_stats))
    m = defense.extra_metrics()
    for key in ("l_rce", "l_rcl", "l_lce", "l_ct"):
        assert m[key] == pytest.approx(sum(float(st[key]) for st in seen) / 3, rel=1e-6)
    assert (m["frac_rce_relax"], m["frac_rce_fit"], m["frac_rce_even"]) == (1.0, 0.0, 0.0)
    assert (m["frac_rcl_fit"], m["frac_rcl_relax"], m["frac_rcl_even"]) == (1.0, 0.0, 0.0)
    step(defense, ctx, 2)
    m2 = defense.extra_metrics()
    assert m2["frac_rce_even"] == 1.0 and m2["frac_rcl_even"] == 1.0
    assert defense.extra_metrics() == {}


def test_relaxloss_metrics():
    defense = build_defense("relaxloss", {"alpha": 1e3})
    ctx = make_ctx()
    defense.prepare(ctx)
    step(defense, ctx, 1)
    step(defense, ctx, 2)
    m = defense.extra_metrics()
    assert m["frac_ce_relax"] == 0.5 and m["frac_ce_even"] == 0.5 and m["l_ce"] > 0


def test_warns_when_the_center_term_relaxes_from_the_start():
    import warnings

    from crl.data.datasets import load_dataset
    from crl.models import create_model
    from crl.train import Recipe, fit

    data = load_dataset("digits")
    idx = torch.arange(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        fit(create_model("mlp", 1, 8, 10), data, idx, Recipe(epochs=1, device="cpu"),
            build_defense("crl", {"alpha_rcl": 1e6}), progress=False)
        torch.manual_seed(0)
        fit(create_model("mlp", 1, 8, 10), data, idx, Recipe(epochs=1, device="cpu"),
            build_defense("crl"), progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "alpha_rcl=1000000.0 is above" in messages[0]
