"""The crl, imprelaxloss, rcl and relaxloss defenses on a tiny model and TrainContext."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import crl.defenses  # noqa: F401  (registers every defense)
from crl.core.errors import CRLError
from crl.core.params import Param
from crl.core.registry import DEFENSES
from crl.core.seeding import torch_generator
from crl.data.types import ImageData
from crl.defenses.base import Changes, Step, TrainContext, build_defense, default_sampler
from crl.losses import LossStats, crl_batched
from crl.training.recipe import Recipe

NAMES = ["crl", "imprelaxloss", "rcl", "relaxloss"]
N, IN, HID, K = 12, 8, 6, 3


def make_ctx(seed=0, feat_dim=HID):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, K))
    data = ImageData("tiny", torch.zeros(N, 1, 1, IN, dtype=torch.uint8), torch.arange(N) % K,
                     K, (0.0,), (1.0,))
    recipe = Recipe(epochs=2, batch_size=4, seed=seed, device="cpu")
    return TrainContext(data=data, recipe=recipe, model=model,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        train_idx=torch.arange(N), device=torch.device("cpu"),
                        feat_dim=feat_dim, sampler=default_sampler(recipe))


def make_step(defense, ctx, epoch, seed=0):
    """A fit-like Step of one model (leading model axis of 1)."""
    x = torch.randn(4, 1, 1, IN, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor([0, 1, 2, 1])
    feats = ctx.model[:3](x)
    logits = ctx.model[3](feats)
    return Step(x=x[None], y=y[None], idx=torch.arange(4)[None], logits=logits[None],
                features=feats[None] if defense.needs_features else None, epoch=epoch, step=1)


def step(defense, ctx, epoch, seed=0):
    """One fit-like training step; returns the loss value [1]."""
    loss = defense.loss([ctx], make_step(defense, ctx, epoch, seed))
    assert loss.shape == (1,)
    opts = [ctx.optimizer, *defense.optimizers()]
    for opt in opts:
        opt.zero_grad()
    loss.sum().backward()
    for opt in opts:
        opt.step()
    return loss.detach()


@pytest.mark.parametrize("name", NAMES)
def test_builds_prepares_and_trains(name):
    assert name in DEFENSES and DEFENSES.get(name).name == name
    defense = build_defense(name)
    ctx = make_ctx()
    defense.check(ctx.recipe, N)
    assert defense.prepare([ctx]) == [Changes()]          # changes nothing of the context
    for epoch in (1, 2):
        assert math.isfinite(float(step(defense, ctx, epoch)))
    (end,) = defense.end_epoch([ctx], 2)
    assert end.metrics and all(math.isfinite(v) for v in end.metrics.values()) and not end.stop
    assert defense.end_epoch([ctx], 3)[0].metrics == {}   # the means restart every epoch
    assert defense.report() == {} and defense.evaluation_groups() == {}
    assert type(defense).batchable


def test_a_context_is_read_only_and_changes_make_a_new_one():
    """No hook edits a context: prepare returns `Changes`, the loop applies them."""
    ctx = make_ctx()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.train_idx = ctx.train_idx[:2]
    moved = ctx.with_changes(Changes(train_idx=ctx.train_idx[:2]))
    assert moved.train_idx.tolist() == [0, 1] and ctx.train_idx.numel() == N
    assert moved.model is ctx.model and moved.optimizer is ctx.optimizer
    assert ctx.with_changes(Changes()) == ctx


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
    assert not build_defense("imprelaxloss").needs_features


def test_specs_declare_search_ranges_and_ablations_drop_fixed_params():
    crl_spec = DEFENSES.get("crl").spec
    for name in ("alpha_rce", "alpha_rcl", "tau_rce", "tau_rcl", "lam"):
        p = crl_spec[name]
        assert isinstance(p, Param) and p.search is not None and p.help
        lo, hi, scale = p.search
        assert lo <= p.default <= hi and scale in ("linear", "log")
    assert DEFENSES.get("relaxloss").spec["alpha"].search is not None
    assert "lam" not in DEFENSES.get("imprelaxloss").spec
    assert not {"tau_rce", "tau_rcl"} & set(DEFENSES.get("rcl").spec.names())
    assert set(DEFENSES.get("rcl").spec.names()) | {"tau_rce", "tau_rcl"} == set(crl_spec.names())


@pytest.mark.parametrize("name,params", [
    ("imprelaxloss", {"lam": 0.1}), ("rcl", {"tau_rce": 0.1}), ("rcl", {"tau_rcl": 0.0})])
def test_fixed_param_raises(name, params):
    with pytest.raises(CRLError, match="fixed") as e:
        build_defense(name, params)
    key = next(iter(params))
    assert f"{name}.{key}" in str(e.value) and "'crl'" in str(e.value)


@pytest.mark.parametrize("name,params,expected", [
    ("crl", {"beta": 1}, "unknown parameter"), ("crl", {"lam": -0.1}, "crl.lam = -0.1"),
    ("crl", {"center_update": "x"}, "one of: paper, authors"),
    ("crl", {"upper": 1.5}, "crl.upper"), ("crl", {"detach_targets": 1}, "true or false"),
    ("relaxloss", {"alpha": -1}, "relaxloss.alpha = -1"), ("relaxloss", {"lam": 0.1}, "lam")])
def test_bad_params_raise(name, params, expected):
    with pytest.raises(CRLError, match=expected) as e:
        build_defense(name, params)
    assert "\n" not in str(e.value)


def test_loss_before_prepare_raises():
    ctx = make_ctx()
    s = Step(x=torch.zeros(1, 2, 1, 1, IN), y=torch.zeros(1, 2).long(), idx=torch.arange(2)[None],
             logits=torch.zeros(1, 2, K), features=torch.zeros(1, 2, HID), epoch=1, step=1)
    for name in ("crl", "relaxloss"):
        with pytest.raises(CRLError, match="prepare"):
            build_defense(name).loss([ctx], s)
        with pytest.raises(CRLError, match="prepare"):
            build_defense(name).end_epoch([ctx], 1)


def test_centers_come_from_the_centers_stream_and_optimizer_is_the_centers():
    a, b, c = (build_defense("crl") for _ in range(3))
    a.prepare([make_ctx(seed=0)])
    b.prepare([make_ctx(seed=0)])
    c.prepare([make_ctx(seed=1), make_ctx(seed=0)])
    assert a.centers.shape == (1, K, HID) and c.centers.shape == (2, K, HID)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.centers[0], c.centers[1])
    assert not torch.equal(a.centers[0], c.centers[0])
    expected = torch.randn(K, HID, generator=torch_generator(0, "centers"))
    assert torch.equal(a.centers[0].detach(), expected)
    shuffle = torch.randn(K, HID, generator=torch_generator(0, "shuffle"))
    assert not torch.equal(expected, shuffle)                     # a stream of its own
    (opt,) = a.optimizers()
    assert opt.param_groups[0]["params"][0] is a.centers
    assert opt.param_groups[0]["lr"] == 0.001


def test_crl_without_features_raises_and_imprelaxloss_needs_none():
    with pytest.raises(CRLError, match="feat_dim"):
        build_defense("crl").prepare([make_ctx(feat_dim=None)])
    defense = build_defense("imprelaxloss")
    ctx = make_ctx(feat_dim=None)
    defense.prepare([ctx])
    assert defense.optimizers() == []
    step(defense, ctx, 1)
    metrics = defense.end_epoch([ctx], 1)[0].metrics
    assert "l_ct" not in metrics and "l_rce" in metrics and "frac_rce_fit" in metrics
    assert not any(k.startswith("frac_rcl") for k in metrics)
    assert defense.state_dict()["centers"] is None


@pytest.mark.parametrize("name", ["crl", "rcl", "relaxloss"])
@pytest.mark.parametrize("center_update", ["paper", "authors"])
def test_state_dict_round_trip_resumes_exactly(name, center_update):
    params = {} if name == "relaxloss" else {"center_update": center_update}
    ctx_a, ctx_b = make_ctx(seed=0), make_ctx(seed=5)   # b: other centers, overwritten by the state
    a = build_defense(name, params)
    a.prepare([ctx_a])
    step(a, ctx_a, 1, seed=1)
    state = a.state_dict()
    b = build_defense(name, params)
    b.prepare([ctx_b])                             # fit: load_state_dict comes after prepare
    b.load_state_dict(state)
    ctx_b.model.load_state_dict(ctx_a.model.state_dict())
    ctx_b.optimizer.load_state_dict(ctx_a.optimizer.state_dict())
    for epoch in (2, 3):
        la, lb = step(a, ctx_a, epoch, seed=epoch), step(b, ctx_b, epoch, seed=epoch)
        assert torch.equal(la, lb)
    if name != "relaxloss":
        assert torch.equal(a.centers, b.centers)
        assert not torch.equal(a.centers, state["centers"])     # centers moved
        with pytest.raises(CRLError, match="shape"):
            build_defense(name, params).load_state_dict(state)   # before prepare: no centers
        with pytest.raises(CRLError, match="shape"):
            b.load_state_dict({"centers": torch.zeros(1, K + 1, HID)})


def test_epoch_means_are_returned_by_end_epoch():
    defense = build_defense("crl", {"alpha_rce": 1e3, "alpha_rcl": 0.0})
    ctx = make_ctx()
    defense.prepare([ctx])
    seen = []
    for s in range(3):
        stats = LossStats()       # the step's stats, recomputed before it updates anything
        one = make_step(defense, ctx, 1, seed=s)
        crl_batched(one.logits, one.features, one.y, defense.centers, 1, stats=stats,
                    **defense.params)
        seen.append({k: stats[k] for k in ("l_rce", "l_rcl", "l_lce", "l_ct")})
        step(defense, ctx, 1, seed=s)
    m = defense.end_epoch([ctx], 1)[0].metrics
    for key in ("l_rce", "l_rcl", "l_lce", "l_ct"):
        assert m[key] == pytest.approx(sum(float(st[key]) for st in seen) / 3, rel=1e-6)
    assert (m["frac_rce_relax"], m["frac_rce_fit"], m["frac_rce_even"]) == (1.0, 0.0, 0.0)
    assert (m["frac_rcl_fit"], m["frac_rcl_relax"], m["frac_rcl_even"]) == (1.0, 0.0, 0.0)
    step(defense, ctx, 2)
    m2 = defense.end_epoch([ctx], 2)[0].metrics
    assert m2["frac_rce_even"] == 1.0 and m2["frac_rcl_even"] == 1.0
    assert defense.end_epoch([ctx], 3)[0].metrics == {}


def test_relaxloss_metrics():
    defense = build_defense("relaxloss", {"alpha": 1e3})
    ctx = make_ctx()
    defense.prepare([ctx])
    step(defense, ctx, 1)
    step(defense, ctx, 2)
    m = defense.end_epoch([ctx], 2)[0].metrics
    assert m["frac_ce_relax"] == 0.5 and m["frac_ce_even"] == 0.5 and m["l_ce"] > 0


def test_warns_when_the_center_term_relaxes_from_the_start():
    import warnings

    from crl.data.datasets import load_dataset
    from crl.engine.fit import fit
    from crl.models import create_model

    data = load_dataset("digits")
    idx = torch.arange(64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        res = fit(create_model("mlp", 1, 8, 10), data, idx, Recipe(epochs=1, device="cpu"),
                  build_defense("crl", {"alpha_rcl": 1e6}), progress=False)
        torch.manual_seed(0)
        fit(create_model("mlp", 1, 8, 10), data, idx, Recipe(epochs=1, device="cpu"),
            build_defense("crl"), progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "alpha_rcl=1000000.0 is above" in messages[0]
    assert res.history[0]["frac_rcl_relax"] == 1.0 and f"{res.history[0]['l_ct']:.3g}" in \
        messages[0]
