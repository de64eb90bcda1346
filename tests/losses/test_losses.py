"""CRLLoss and RelaxLoss against an independent plain-torch recomputation of SPEC sections 1-4.

The reference functions below are written from the SPEC's formulas and do not call crl's helpers.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crl.core.errors import CRLError
from crl.losses import (
    BRANCHES,
    CRLLoss,
    LossStats,
    RelaxLoss,
    branch_code,
    crl_batched,
    relaxed_objective,
    relaxloss_batched,
)

B, C, D = 6, 4, 5
BIG = 1e3          # an alpha above any loss level: forces the relaxed branch on odd epochs


# --- independent recomputation -----------------------------------------------------------------
def ref_norm(v, t):
    if t == 0:
        return v
    return v / (1 + t * torch.sqrt((v * v).sum(dim=1, keepdim=True)))


def ref_confidence(g, y, upper, detach):
    rows = torch.arange(g.shape[0])
    p_y = torch.softmax(g, dim=1)[rows, y]
    p_y = torch.minimum(p_y, torch.full_like(p_y, upper))
    return p_y.detach() if detach else p_y


def ref_soft_target(p_y, y, num_classes):
    rows = torch.arange(p_y.shape[0])
    tar = ((1 - p_y) / (num_classes - 1)).unsqueeze(1).repeat(1, num_classes)
    tar[rows, y] = p_y
    return tar


def ref_crl(g, q, centers, y, epoch, *, alpha_rce, alpha_rcl, tau_rce, tau_rcl, upper=1.0,
            detach=False):
    """(L_rce, L_rcl, L_lce, L_ct) from SPEC sections 1 and 2."""
    n, k = g.shape
    rows = torch.arange(n)
    p_y = ref_confidence(g, y, upper, detach)
    log_pn = torch.log_softmax(ref_norm(g, tau_rce), dim=1)
    l_lce = -log_pn[rows, y].mean()
    l_sce = -(ref_soft_target(p_y, y, k) * log_pn).sum(dim=1).mean()
    if epoch % 2 == 0:
        l_rce = (l_lce - alpha_rce).abs()
    elif l_lce.item() > alpha_rce:
        l_rce = l_lce
    else:
        l_rce = l_sce
    l_rcl = l_ct = None
    if q is not None:
        q_n = ref_norm(q, tau_rcl)
        c_n = ref_norm(centers[y], tau_rcl)
        d2 = ((q_n - c_n) ** 2).sum(dim=1)
        l_ct = d2.sum() / (2 * n)
        if epoch % 2 == 0:
            l_rcl = (l_ct - alpha_rcl).abs()
        elif l_ct.item() > alpha_rcl:
            l_rcl = l_ct
        else:
            l_rcl = (p_y * d2 + (1 - p_y) * (q_n ** 2).sum(dim=1)).sum() / (2 * n)
    return l_rce, l_rcl, l_lce, l_ct


def ref_relaxloss(g, y, epoch, *, alpha, upper=1.0):
    n, k = g.shape
    rows = torch.arange(n)
    log_p = torch.log_softmax(g, dim=1)
    ce = -log_p[rows, y]
    l_ce = ce.mean()
    chen_epoch = epoch - 1          # Chen et al.'s code counts epochs from 0
    if chen_epoch % 2 == 0:
        return (l_ce - alpha).abs()
    if l_ce.item() > alpha:
        return l_ce
    correct = (g.argmax(dim=1) == y).to(g.dtype)
    soft = -(ref_soft_target(ref_confidence(g, y, upper, False), y, k) * log_p).sum(dim=1)
    return ((1 - correct) * soft - ce).mean()


# --- fixtures ----------------------------------------------------------------------------------
def tol(dtype):
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": 1e-10, "atol": 1e-12}


def batch(dtype, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    g = (scale * torch.randn(B, C, generator=gen)).to(dtype).requires_grad_()
    q = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    return g, q, y


def make_crl(dtype, **kw):
    hp = {"alpha_rce": 0.5, "alpha_rcl": 1.0, "tau_rce": 0.05, "tau_rcl": 0.1, "lam": 0.3}
    hp.update(kw)
    loss = CRLLoss(C, D, generator=torch.Generator().manual_seed(1), **hp)
    return loss.to(dtype)


def ref_hp(loss):
    return {"alpha_rce": loss.alpha_rce, "alpha_rcl": loss.alpha_rcl, "tau_rce": loss.tau_rce,
                "tau_rcl": loss.tau_rcl, "upper": loss.upper, "detach": loss.detach_targets}


def grads(value, inputs):
    return torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)


def assert_close_all(got, want, dtype):
    for a, b in zip(got, want):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **tol(dtype))


# (epoch, alpha_rce, alpha_rcl, expected rce branch, expected rcl branch)
CASES = [
    (2, 0.2, 0.1, "even", "even"),        # even epoch, loss above alpha
    (4, BIG, BIG, "even", "even"),        # even epoch, loss below alpha: gradient reversed
    (3, 0.0, 0.0, "fit", "fit"),
    (3, 0.0, BIG, "fit", "relax"),
    (3, BIG, 0.0, "relax", "fit"),
    (1, BIG, BIG, "relax", "relax"),
]
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epoch,a_rce,a_rcl,b_rce,b_rcl", CASES)
def test_crl_terms_values_and_gradients(dtype, epoch, a_rce, a_rcl, b_rce, b_rcl):
    loss = make_crl(dtype, alpha_rce=a_rce, alpha_rcl=a_rcl)
    g, q, y = batch(dtype)
    c = loss.centers.detach().clone().requires_grad_()
    r_rce, r_rcl, r_lce, r_ct = ref_crl(g, q, c, y, epoch, **ref_hp(loss))
    l_rce, l_rcl = loss.terms(g, q, y, epoch)
    stats = loss.last_stats
    assert (stats["rce_branch"], stats["rcl_branch"]) == (b_rce, b_rcl)
    torch.testing.assert_close(l_rce, r_rce, **tol(dtype))
    torch.testing.assert_close(l_rcl, r_rcl, **tol(dtype))
    torch.testing.assert_close(stats["l_lce"], r_lce.detach(), **tol(dtype))
    torch.testing.assert_close(stats["l_ct"], r_ct.detach(), **tol(dtype))
    # each term's gradient w.r.t. logits, features and centers
    assert_close_all(grads(l_rce, (g, q, loss.centers)), grads(r_rce, (g, q, c)), dtype)
    assert_close_all(grads(l_rcl, (g, q, loss.centers)), grads(r_rcl, (g, q, c)), dtype)
    # the total: model sees grad(L_rce + lam L_rcl); centers (paper) see grad_c L_rcl
    total = loss(g, q, y, epoch)
    r_total = r_rce + loss.lam * r_rcl
    torch.testing.assert_close(total, r_total, **tol(dtype))
    assert_close_all(grads(total, (g, q)), grads(r_total, (g, q)), dtype)
    assert_close_all(grads(total, (loss.centers,)), grads(r_rcl, (c,)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epoch,a_rce,a_rcl", [(2, 0.2, 0.1), (3, BIG, BIG), (3, 0.0, 0.0)])
def test_paper_center_step_is_exact(dtype, epoch, a_rce, a_rcl):
    loss = make_crl(dtype, alpha_rce=a_rce, alpha_rcl=a_rcl, lam=0.1)
    opt = loss.make_center_optimizer()
    g, q, y = batch(dtype, seed=3)
    c0 = loss.centers.detach().clone()
    c = c0.clone().requires_grad_()
    _, r_rcl, _, _ = ref_crl(g, q, c, y, epoch, **ref_hp(loss))
    (g_c,) = torch.autograd.grad(r_rcl, c)
    opt.zero_grad()
    loss(g, q, y, epoch).backward()
    opt.step()
    torch.testing.assert_close(loss.centers.detach(), c0 - 0.001 * g_c, **tol(dtype))
    assert not torch.equal(loss.centers.detach(), c0)
    # absent classes would not move; class 0..3 all present here, so every row moved
    assert (loss.centers.detach() != c0).any(dim=1).all()


def test_authors_center_update_uses_momentum_and_weight_decay():
    dtype = torch.float64
    loss = make_crl(dtype, alpha_rce=BIG, alpha_rcl=BIG, lam=0.25, center_update="authors")
    opt = loss.make_center_optimizer()
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.001, 0.9, 5e-4)
    g, q, y = batch(dtype, seed=4)
    c = loss.centers.detach().clone()
    buf = None
    for _ in range(2):
        cr = c.clone().requires_grad_()
        _, r_rcl, _, _ = ref_crl(g, q, cr, y, 1, **ref_hp(loss))
        (g_c,) = torch.autograd.grad(r_rcl, cr)
        opt.zero_grad()
        loss(g, q, y, 1).backward()
        # authors: the centers see lam * grad_c L_rcl from the total loss
        torch.testing.assert_close(loss.centers.grad, 0.25 * g_c, **tol(dtype))
        d = 0.25 * g_c + 5e-4 * c
        buf = d if buf is None else 0.9 * buf + d
        c = c - 0.001 * buf
        opt.step()
        torch.testing.assert_close(loss.centers.detach(), c, **tol(dtype))


@pytest.mark.parametrize("center_update", ["paper", "authors"])
def test_lam_zero_leaves_centers_untouched(center_update):
    loss = make_crl(torch.float32, lam=0.0, center_update=center_update)
    opt = loss.make_center_optimizer()
    c0 = loss.centers.detach().clone()
    g, q, y = batch(torch.float32)
    r_rce, _, _, _ = ref_crl(g, None, None, y, 3, **ref_hp(loss))
    for features in (q, None):
        opt.zero_grad()
        value = loss(g, features, y, 3)
        torch.testing.assert_close(value, r_rce, **tol(torch.float32))
        value.backward()
        assert loss.centers.grad is None or torch.count_nonzero(loss.centers.grad) == 0
        opt.step()
        assert torch.equal(loss.centers.detach(), c0)
    assert loss.last_stats["l_ct"] is None and loss.last_stats["rcl_branch"] is None
    # without centers at all (feat_dim None) when lam == 0
    bare = CRLLoss(C, None, alpha_rce=0.5, alpha_rcl=1.0, tau_rce=0.05, tau_rcl=0.1, lam=0.0)
    torch.testing.assert_close(bare(g, None, y, 3), r_rce, **tol(torch.float32))


def test_lam_positive_gives_center_gradients():
    loss = make_crl(torch.float32, lam=0.5)
    g, q, y = batch(torch.float32)
    y = torch.tensor([0, 1, 1, 0, 1, 0])          # classes 2 and 3 absent
    loss(g, q, y, 3).backward()
    grad = loss.centers.grad
    assert grad is not None
    assert torch.count_nonzero(grad[:2]) > 0 and torch.count_nonzero(grad[2:]) == 0


def test_tau_zero_means_no_normalisation():
    loss = make_crl(torch.float64, tau_rce=0.0, tau_rcl=0.0, alpha_rce=0.0, alpha_rcl=0.0)
    g, q, y = batch(torch.float64)
    l_rce, l_rcl = loss.terms(g, q, y, 1)
    torch.testing.assert_close(l_rce, torch.nn.functional.cross_entropy(g, y))
    c = loss.centers.detach()
    torch.testing.assert_close(l_rcl, ((q - c[y]) ** 2).sum() / (2 * B))
    # and tau > 0 does change the value
    l_rce2, l_rcl2 = make_crl(torch.float64, alpha_rce=0.0, alpha_rcl=0.0).terms(g, q, y, 1)
    assert not torch.allclose(l_rce2, l_rce) and not torch.allclose(l_rcl2, l_rcl)


def confident_batch(dtype):
    g, q, y = batch(dtype)
    g = g.detach().clone()
    g[torch.arange(B), y] += torch.tensor([6.0, 6.0, 6.0, 0.0, 0.0, 0.0], dtype=dtype)
    return g.requires_grad_(), q, y


@pytest.mark.parametrize("dtype", DTYPES)
def test_upper_clamps_the_target_confidence(dtype):
    loss = make_crl(dtype, alpha_rce=BIG, alpha_rcl=BIG, upper=0.3)
    g, q, y = confident_batch(dtype)
    p_y = torch.softmax(g, 1)[torch.arange(B), y]
    assert (p_y > 0.3).any() and (p_y < 0.3).any()
    c = loss.centers.detach().clone().requires_grad_()
    got = loss.terms(g, q, y, 1)
    want = ref_crl(g, q, c, y, 1, **ref_hp(loss))[:2]
    unclamped = ref_crl(g, q, c, y, 1, **{**ref_hp(loss), "upper": 1.0})[:2]
    for a, b, u in zip(got, want, unclamped):
        torch.testing.assert_close(a, b, **tol(dtype))
        assert not torch.allclose(a, u)
        assert_close_all(grads(a, (g, q)), grads(b, (g, q)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_detach_targets_stops_the_target_gradient(dtype):
    loss = make_crl(dtype, alpha_rce=BIG, alpha_rcl=BIG, detach_targets=True)
    g, q, y = batch(dtype)
    c = loss.centers.detach().clone().requires_grad_()
    got = loss.terms(g, q, y, 1)
    want = ref_crl(g, q, c, y, 1, **ref_hp(loss))[:2]
    flowing = ref_crl(g, q, c, y, 1, **{**ref_hp(loss), "detach": False})[:2]
    for a, b, f in zip(got, want, flowing):
        torch.testing.assert_close(a, b, **tol(dtype))
        torch.testing.assert_close(a, f, **tol(dtype))          # same value ...
        assert_close_all(grads(a, (g, q)), grads(b, (g, q)), dtype)
        (ga,), (gf,) = grads(a, (g,)), grads(f, (g,))
        ga = torch.zeros_like(g) if ga is None else ga
        assert not torch.allclose(ga, gf)                         # ... different gradient
    # L_rcl in the relaxed branch only touches the logits through the (now detached) targets
    (g_rcl,) = grads(got[1], (g,))
    assert g_rcl is None or torch.count_nonzero(g_rcl) == 0


def bad_inputs():
    g, q, y = batch(torch.float32)
    loss = make_crl(torch.float32)
    nan_g = g.detach().clone()
    nan_g[0, 0] = float("nan")
    inf_q = q.detach().clone()
    inf_q[1, 1] = float("inf")
    hp = {"alpha_rce": 0.5, "alpha_rcl": 1.0, "tau_rce": 0.05, "tau_rcl": 0.1, "lam": 0.1}
    return {
        "logits classes": lambda: loss(g[:, :3], q, y, 1),
        "logits 1-d": lambda: loss(g[0], q, y, 1),
        "logits int": lambda: loss(g.long(), q, y, 1),
        "features dim": lambda: loss(g, q[:, :4], y, 1),
        "features batch": lambda: loss(g, q[:5], y, 1),
        "features none": lambda: loss(g, None, y, 1),
        "targets float": lambda: loss(g, q, y.float(), 1),
        "targets shape": lambda: loss(g, q, y[:5], 1),
        "targets high": lambda: loss(g, q, torch.full((B,), C), 1),
        "targets negative": lambda: loss(g, q, torch.full((B,), -1), 1),
        "logits nan": lambda: loss(nan_g, q, y, 1),
        "features inf": lambda: loss(g, inf_q, y, 1),
        "epoch zero": lambda: loss(g, q, y, 0),
        "epoch float": lambda: loss(g, q, y, 1.0),
        "epoch bool": lambda: loss(g, q, y, True),
        "alpha negative": lambda: CRLLoss(C, D, **{**hp, "alpha_rce": -0.1}),
        "lam negative": lambda: CRLLoss(C, D, **{**hp, "lam": -1.0}),
        "tau nan": lambda: CRLLoss(C, D, **{**hp, "tau_rcl": float("nan")}),
        "upper above one": lambda: CRLLoss(C, D, **hp, upper=1.5),
        "detach not bool": lambda: CRLLoss(C, D, **hp, detach_targets="yes"),
        "center_update": lambda: CRLLoss(C, D, **hp, center_update="fast"),
        "one class": lambda: CRLLoss(1, D, **hp),
        "feat_dim none": lambda: CRLLoss(C, None, **hp),
        "relax alpha": lambda: RelaxLoss(C, alpha=-1.0),
        "relax logits": lambda: RelaxLoss(C, alpha=1.0)(g[:, :3], y, 1),
        "relax epoch": lambda: RelaxLoss(C, alpha=1.0)(g, y, -2),
    }


def test_hyper_parameters_are_keyword_only():
    with pytest.raises(TypeError):
        CRLLoss(C, D, 0.5, 1.0, 0.05, 0.1, 0.1)  # type: ignore[misc]
    with pytest.raises(TypeError):
        RelaxLoss(C, 0.5)  # type: ignore[misc]


def test_centers_initialised_from_generator():
    hp = {"alpha_rce": 0.5, "alpha_rcl": 1.0, "tau_rce": 0.05, "tau_rcl": 0.1, "lam": 0.1}
    a = CRLLoss(C, D, generator=torch.Generator().manual_seed(7), **hp)
    b = CRLLoss(C, D, generator=torch.Generator().manual_seed(7), **hp)
    assert isinstance(a.centers, torch.nn.Parameter) and a.centers.shape == (C, D)
    assert torch.equal(a.centers, b.centers)
    assert torch.equal(a.centers, torch.randn(C, D, generator=torch.Generator().manual_seed(7)))


# --- RelaxLoss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epoch,alpha,branch", [(1, 0.3, "even"), (5, BIG, "even"),
                                                (2, 0.0, "fit"), (4, BIG, "relax")])
@pytest.mark.parametrize("upper", [1.0, 0.3])
def test_relaxloss_matches_reference(dtype, epoch, alpha, branch, upper):
    g, _, y = confident_batch(dtype)
    correct = g.argmax(1) == y
    assert correct.any() and not correct.all()          # a mix of correct and incorrect samples
    loss = RelaxLoss(C, alpha=alpha, upper=upper)
    got = loss(g, y, epoch)
    want = ref_relaxloss(g, y, epoch, alpha=alpha, upper=upper)
    assert loss.last_stats["branch"] == branch
    torch.testing.assert_close(got, want, **tol(dtype))
    assert_close_all(grads(got, (g,)), grads(want, (g,)), dtype)


def test_epoch_parity_follows_each_methods_source():
    """RelaxLoss as Chen et al.'s code runs it (epochs from 0: crl's first epoch is their even
    epoch 0, |L_ce - alpha|); CRL as its paper's Algorithm 1 (epochs from 1: epoch 2 is the
    first even one). A loss below alpha shows the parity: even -> gradient reversed."""
    g, q, y = confident_batch(torch.float64)
    relax = RelaxLoss(C, alpha=BIG)
    got = [(relax(g, y, e), relax.last_stats["branch"])[1] for e in (1, 2, 3, 4)]
    assert got == ["even", "relax", "even", "relax"]
    l_ce = torch.nn.functional.cross_entropy(g, y)
    torch.testing.assert_close(relax(g, y, 1), BIG - l_ce)          # |L_ce - alpha|, alpha > L
    crl = CRLLoss(C, D, alpha_rce=BIG, alpha_rcl=BIG, tau_rce=0.1, tau_rcl=0.1, lam=0.1)
    branches = []
    for e in (1, 2, 3, 4):
        crl(g, q, y, e)
        branches.append(crl.last_stats["rce_branch"])
    assert branches == ["relax", "even", "relax", "even"]
    stats = LossStats()
    relaxloss_batched(g.unsqueeze(0), y.unsqueeze(0), BIG, 1, stats=stats)
    assert stats["branch"] == ("even",)


# --- K models at once: branch-free batched forms -----------------------------------------------
K = 4
F64 = torch.float64


def model_batches(seed=5):
    """Logits [K, B, C] (leaf), features [K, B, D] (leaf) and targets [K, B], float64."""
    gen = torch.Generator().manual_seed(seed)
    g = (2.0 * torch.randn(K, B, C, generator=gen, dtype=F64)).requires_grad_()
    q = torch.randn(K, B, D, generator=gen, dtype=F64).requires_grad_()
    y = torch.randint(0, C, (K, B), generator=gen)
    return g, q, y


def split(t, k):
    """Model k's slice as its own leaf (for the single-model reference)."""
    return t[k].detach().clone().requires_grad_()


def as_kind(values, kind):
    return {"list": list(values), "tensor": torch.tensor(values, dtype=F64)}[kind]


# RelaxLoss's odd epoch (crl's 2, 4, ...): every model in another branch; its even epoch
# (crl's 1, 3, ...): above and below alpha
RELAX_ALPHAS = {2: [0.0, BIG, 0.0, BIG], 1: [0.0, BIG, 0.3, BIG]}
RELAX_WANT = {2: ("fit", "relax", "fit", "relax"), 1: ("even",) * K}


@pytest.mark.parametrize("kind", ["list", "tensor"])
@pytest.mark.parametrize("epoch", [1, 2])
def test_relaxloss_batched_equals_k_single_calls(epoch, kind):
    g, _, y = model_batches()
    alphas = RELAX_ALPHAS[epoch]
    stats = LossStats()
    got = relaxloss_batched(g, y, as_kind(alphas, kind), epoch, upper=0.7, stats=stats)
    assert got.shape == (K,) and stats["branch"] == RELAX_WANT[epoch]
    (g_grad,) = torch.autograd.grad(got.sum(), g)
    for k in range(K):
        gk = split(g, k)
        single = RelaxLoss(C, alpha=alphas[k], upper=0.7)
        want = single(gk, y[k], epoch)
        assert single.last_stats["branch"] == RELAX_WANT[epoch][k]
        torch.testing.assert_close(got[k], want, **tol(F64))
        torch.testing.assert_close(stats["l_ce"][k], single.last_stats["l_ce"], **tol(F64))
        torch.testing.assert_close(g_grad[k], torch.autograd.grad(want, gk)[0], **tol(F64))


# (alpha_rce, alpha_rcl) per model: odd epochs cover all four branch pairs
CRL_ALPHAS = ([0.0, BIG, BIG, 0.0], [0.0, 0.0, BIG, BIG])
CRL_WANT = {3: (("fit", "relax", "relax", "fit"), ("fit", "fit", "relax", "relax")),
            2: (("even",) * K, ("even",) * K)}


def single_crl(centers_k, alpha_rce, alpha_rcl, center_update):
    loss = make_crl(F64, alpha_rce=alpha_rce, alpha_rcl=alpha_rcl, center_update=center_update)
    with torch.no_grad():
        loss.centers.copy_(centers_k)
    return loss


@pytest.mark.parametrize("center_update", ["paper", "authors"])
@pytest.mark.parametrize("epoch,kind", [(3, "list"), (3, "tensor"), (2, "list")])
def test_crl_batched_equals_k_single_calls(epoch, kind, center_update):
    g, q, y = model_batches()
    centers = torch.randn(K, C, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    centers.requires_grad_()
    a_rce, a_rcl = CRL_ALPHAS
    stats = LossStats()
    got = crl_batched(g, q, y, centers, epoch, alpha_rce=as_kind(a_rce, kind),
                      alpha_rcl=as_kind(a_rcl, kind), tau_rce=0.05, tau_rcl=0.1, lam=0.3,
                      center_update=center_update, stats=stats)
    assert (stats["rce_branch"], stats["rcl_branch"]) == CRL_WANT[epoch]
    batched_grads = torch.autograd.grad(got.sum(), (g, q, centers))
    for k in range(K):
        single = single_crl(centers[k].detach(), a_rce[k], a_rcl[k], center_update)
        gk, qk = split(g, k), split(q, k)
        want = single(gk, qk, y[k], epoch)
        got_k = (single.last_stats["rce_branch"], single.last_stats["rcl_branch"])
        assert got_k == (CRL_WANT[epoch][0][k], CRL_WANT[epoch][1][k])
        torch.testing.assert_close(got[k], want, **tol(F64))
        for key in ("l_rce", "l_rcl", "l_lce", "l_ct"):
            torch.testing.assert_close(stats[key][k], single.last_stats[key], **tol(F64))
        single_grads = torch.autograd.grad(want, (gk, qk, single.centers))
        for batched, one in zip(batched_grads, single_grads):
            torch.testing.assert_close(batched[k], one, **tol(F64))


def test_crl_batched_shared_alphas_and_lam_zero():
    g, q, y = model_batches(seed=8)
    centers = torch.randn(K, C, D, dtype=F64)
    hp = {"alpha_rce": 0.5, "alpha_rcl": 1.0, "tau_rce": 0.05, "tau_rcl": 0.1}
    for lam in (0.3, 0.0):
        got = crl_batched(g, q if lam else None, y, centers if lam else None, 1, lam=lam, **hp)
        for k in range(K):
            single = make_crl(F64, lam=lam, **hp)
            with torch.no_grad():
                single.centers.copy_(centers[k])
            want = single(g[k], q[k] if lam else None, y[k], 1)
            torch.testing.assert_close(got[k], want, **tol(F64))


class CountSyncs(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (.item(), bool(), float(), int())."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def run_batched(name, validate, stats):
    g, q, y = model_batches()
    if name == "relaxloss":
        return relaxloss_batched(g, y, torch.tensor(RELAX_ALPHAS[2], dtype=F64), 2,
                                 validate=validate, stats=stats)
    centers = torch.randn(K, C, D, dtype=F64, requires_grad=True)
    return crl_batched(g, q, y, centers, 3, alpha_rce=0.5, alpha_rcl=1.0, tau_rce=0.05,
                       tau_rcl=0.1, lam=0.3, validate=validate, stats=stats)


@pytest.mark.parametrize("name", ["relaxloss", "crl"])
def test_batched_forward_and_backward_never_wait_for_the_device(name):
    for validate, syncs in ((False, 0), (True, 1)):        # the value checks: one sync
        stats = LossStats()
        with CountSyncs() as counter:
            run_batched(name, validate, stats).sum().backward()
            branches = {key: stats.code(key) for key in stats if key.endswith("branch")}
        assert counter.syncs == syncs
        assert all(code.shape == (K,) and code.dtype == torch.int64 for code in branches.values())


def test_single_model_stats_sync_only_when_read():
    loss = make_crl(torch.float32, alpha_rce=BIG, alpha_rcl=0.0)
    g, q, y = batch(torch.float32)
    with CountSyncs() as counter:
        loss(g, q, y, 3).backward()
        assert counter.syncs == 1                             # the input check only
        assert isinstance(loss.last_stats["l_ct"], torch.Tensor)
        assert counter.syncs == 1
        assert loss.last_stats["rce_branch"] == "relax" and loss.last_stats["rcl_branch"] == "fit"
        assert counter.syncs == 3                             # reading a branch name syncs
    assert int(loss.last_stats.code("rce_branch")) == BRANCHES.index("relax")


def test_relaxed_objective_selects_per_model():
    level = torch.tensor([0.2, 0.8, 0.5], dtype=F64, requires_grad=True)
    relaxed = torch.tensor([10.0, 20.0, 30.0], dtype=F64, requires_grad=True)
    alpha = torch.tensor([0.5, 0.5, 0.1], dtype=F64)
    value = relaxed_objective(level, alpha, 1, relaxed)
    torch.testing.assert_close(value, torch.tensor([10.0, 0.8, 0.5], dtype=F64))
    assert branch_code(level, alpha, 1).tolist() == [2, 1, 1]
    g_level, g_relaxed = torch.autograd.grad(value.sum(), (level, relaxed))
    assert g_level.tolist() == [0.0, 1.0, 1.0] and g_relaxed.tolist() == [1.0, 0.0, 0.0]
    even = relaxed_objective(level, alpha, 4, relaxed)
    torch.testing.assert_close(even, torch.tensor([0.3, 0.3, 0.4], dtype=F64))
    assert branch_code(level, alpha, 4).tolist() == [0, 0, 0]


def bad_batched_inputs():
    g, q, y = model_batches()
    centers = torch.randn(K, C, D, dtype=F64)
    nan_g = g.detach().clone()
    nan_g[1, 2, 0] = float("nan")
    hp = {"alpha_rce": 0.5, "alpha_rcl": 1.0, "tau_rce": 0.05, "tau_rcl": 0.1, "lam": 0.1}

    def crl(**kw):
        args = dict(logits=g, features=q, targets=y, centers=centers, epoch=1, **hp)
        args.update(kw)
        return lambda: crl_batched(**args)

    return {
        "relax 2-d logits": lambda: relaxloss_batched(g[0], y[0], 0.5, 1),
        "relax targets shape": lambda: relaxloss_batched(g, y[:2], 0.5, 1),
        "relax alpha count": lambda: relaxloss_batched(g, y, [0.5, 0.5], 1),
        "relax alpha negative": lambda: relaxloss_batched(g, y, [0.5, -1.0, 0.5, 0.5], 1),
        "relax alpha tensor negative": lambda: relaxloss_batched(
            g, y, torch.tensor([0.5, -1.0, 0.5, 0.5]), 1),
        "relax alpha tensor shape": lambda: relaxloss_batched(g, y, torch.ones(K, 1), 1),
        "relax logits nan": lambda: relaxloss_batched(nan_g, y, 0.5, 1),
        "relax targets high": lambda: relaxloss_batched(g, torch.full((K, B), C), 0.5, 1),
        "relax epoch": lambda: relaxloss_batched(g, y, 0.5, 0),
        "relax upper": lambda: relaxloss_batched(g, y, 0.5, 1, upper=2.0),
        "crl centers shape": crl(centers=centers[:, :3]),
        "crl centers none": crl(centers=None),
        "crl features none": crl(features=None),
        "crl features dim": crl(features=q[..., :3]),
        "crl alpha_rcl count": crl(alpha_rcl=[1.0] * (K + 1)),
        "crl alpha_rce nan tensor": crl(alpha_rce=torch.full((K,), float("nan"))),
        "crl lam negative": crl(lam=-0.1),
        "crl center_update": crl(center_update="fast"),
        "crl logits nan": crl(logits=nan_g),
    }


#: every bad input of the single-model losses and of the K-model formulations ("batched ...")
BAD = {**bad_inputs(), **{f"batched {k}": v for k, v in bad_batched_inputs().items()}}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_crlerror(case):
    with pytest.raises(CRLError) as info:
        BAD[case]()
    assert "\n" not in str(info.value) and "expected" in str(info.value)
