"""CRLLoss: Center-based Relaxed Learning (Fang & Kim, UAI 2024), Algorithm 1 and Eqs. 4-9.

    L = L_rce + lam * L_rcl                                   (Algorithm 1 line 22)

L_rce is the improved relaxed loss (ImpRelaxLoss, Eqs. 5-9) and L_rcl the relaxed center loss
(Algorithm 1 lines 5-18, Eq. 4). The class centers are an `nn.Parameter` of this module with
their own optimizer (`make_center_optimizer`). A user's loop needs ~5 extra lines:

    crl = CRLLoss(num_classes, feat_dim, alpha_rce=.5, alpha_rcl=1., tau_rce=.05,
                  tau_rcl=.1, lam=.1).to(device)
    center_opt = crl.make_center_optimizer()
    ...
    loss = crl(logits, features, targets, epoch)          # epoch counts from 1
    opt.zero_grad(); center_opt.zero_grad(); loss.backward(); opt.step(); center_opt.step()

How the paper's center update (Algorithm 1 line 24) is obtained from that single backward:
with center_update="paper", `forward` routes the centers through an identity op whose backward
divides the incoming gradient by lam. The model therefore receives grad(L_rce + lam * L_rcl)
while the centers receive lam * grad_c L_rcl / lam = grad_c L_rcl; the centers' optimizer is
plain SGD with lr 0.001, so one step is exactly c <- c - 0.001 * grad_c L_rcl. The loss value
is unchanged. With center_update="authors" no rescaling is done (centers see lam * grad_c L_rcl)
and their SGD uses momentum 0.9 and weight decay 5e-4, as in the authors' code. `terms()`
returns the plain, unrescaled terms. With lam == 0 the center term is not computed at all: the
centers get no gradient and never move.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from crl.errors import CRLError
from crl.losses.relaxloss import (
    check_batch,
    check_epoch,
    check_hparam,
    check_num_classes,
    relaxed_objective,
    soft_cross_entropy,
    soft_target,
    target_confidence,
)

CENTER_LR = 1e-3               # tau_c, the one value the paper fixes (held constant)
AUTHORS_MOMENTUM = 0.9         # center optimizer of the authors' code
AUTHORS_WEIGHT_DECAY = 5e-4
CENTER_UPDATES = ("paper", "authors")


def normalize(v: torch.Tensor, tau: float) -> torch.Tensor:
    """norm_tau(v) = v / (1 + tau * ||v||_2) per row (Eq. 5; Algorithm 1 line 5); tau=0: v."""
    if tau == 0:
        return v
    return v / (1.0 + tau * torch.linalg.vector_norm(v, dim=-1, keepdim=True))


class _CenterGradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by `factor` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.factor, None


def check_crl_params(*, alpha_rce: float, alpha_rcl: float, tau_rce: float, tau_rcl: float,
                     lam: float, upper: float = 1.0, detach_targets: bool = False,
                     center_update: str = "paper") -> dict:
    """Validate CRL hyper-parameters (CRLError on a bad one); returns them normalised."""
    out = {name: check_hparam(name, value) for name, value in
           (("alpha_rce", alpha_rce), ("alpha_rcl", alpha_rcl), ("tau_rce", tau_rce),
            ("tau_rcl", tau_rcl), ("lam", lam))}
    out["upper"] = check_hparam("upper", upper, upper=1.0)
    if not isinstance(detach_targets, bool):
        raise CRLError(f"detach_targets = {detach_targets!r}; expected True or False")
    out["detach_targets"] = detach_targets
    if center_update not in CENTER_UPDATES:
        raise CRLError(f"center_update = {center_update!r}; expected one of: "
                       f"{', '.join(CENTER_UPDATES)}")
    out["center_update"] = center_update
    return out


class CRLLoss(nn.Module):
    """L = L_rce + lam * L_rcl (Algorithm 1 line 22) with learnable class centers.

    `centers` [num_classes, feat_dim] are initialised standard normal (from `generator` if
    given). `feat_dim=None` is allowed only when lam == 0 (no centers). After each call,
    `last_stats` holds the batch's diagnostics as detached tensors / strings: l_rce, l_rcl,
    l_lce, l_ct, rce_branch, rcl_branch ("even", "fit" or "relax"; None where not computed).
    """

    def __init__(self, num_classes: int, feat_dim: int | None, *, alpha_rce: float,
                 alpha_rcl: float, tau_rce: float, tau_rcl: float, lam: float,
                 upper: float = 1.0, detach_targets: bool = False, center_update: str = "paper",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        hp = check_crl_params(alpha_rce=alpha_rce, alpha_rcl=alpha_rcl, tau_rce=tau_rce,
                              tau_rcl=tau_rcl, lam=lam, upper=upper,
                              detach_targets=detach_targets, center_update=center_update)
        self.alpha_rce, self.alpha_rcl = hp["alpha_rce"], hp["alpha_rcl"]
        self.tau_rce, self.tau_rcl, self.lam = hp["tau_rce"], hp["tau_rcl"], hp["lam"]
        self.upper, self.detach_targets = hp["upper"], hp["detach_targets"]
        self.center_update = hp["center_update"]
        if feat_dim is None and self.lam > 0:
            raise CRLError(f"feat_dim = None with lam = {lam}; expected an int >= 1 when lam > 0")
        if feat_dim is not None and (isinstance(feat_dim, bool)
                                     or not isinstance(feat_dim, numbers.Integral) or feat_dim < 1):
            raise CRLError(f"feat_dim = {feat_dim!r}; expected an int >= 1")
        self.feat_dim = None if feat_dim is None else int(feat_dim)
        if self.feat_dim is None:
            self.register_parameter("centers", None)
        else:
            device = generator.device if generator is not None else None
            init = torch.randn(self.num_classes, self.feat_dim, generator=generator, device=device)
            self.centers = nn.Parameter(init)
        self.last_stats: dict[str, object] = {}

    # --- public API ----------------------------------------------------------------------------
    def make_center_optimizer(self) -> torch.optim.Optimizer:
        """The centers' own optimizer: SGD, lr 0.001 constant ("authors": momentum 0.9, wd 5e-4).

        Create it after moving the module to its device.
        """
        if self.centers is None:
            raise CRLError("this CRLLoss has no centers (feat_dim = None); expected a feat_dim")
        if self.center_update == "authors":
            return torch.optim.SGD([self.centers], lr=CENTER_LR, momentum=AUTHORS_MOMENTUM,
                                   weight_decay=AUTHORS_WEIGHT_DECAY)
        return torch.optim.SGD([self.centers], lr=CENTER_LR)

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None,
                targets: torch.Tensor, epoch: int) -> torch.Tensor:
        """L = L_rce + lam * L_rcl (Algorithm 1 line 22); centers' gradient as in the module doc."""
        use_centers = self.lam > 0
        scale = None
        if use_centers and self.center_update == "paper":
            scale = 1.0 / self.lam
        l_rce, l_rcl = self._terms(logits, features, targets, epoch, use_centers, scale)
        if l_rcl is None:
            return l_rce
        return l_rce + self.lam * l_rcl

    def terms(self, logits: torch.Tensor, features: torch.Tensor | None,
              targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_rce, L_rcl), plain (no gradient rescaling); L_rcl is 0 when features is None."""
        l_rce, l_rcl = self._terms(logits, features, targets, epoch,
                                   features is not None and self.centers is not None, None)
        if l_rcl is None:
            l_rcl = l_rce.new_zeros(())
        return l_rce, l_rcl

    # --- the two terms -------------------------------------------------------------------------
    def _terms(self, logits, features, targets, epoch, use_centers: bool, center_scale):
        epoch = check_epoch(epoch)
        if features is None and self.lam > 0:
            raise CRLError(f"features = None with lam = {self.lam}; expected [B, {self.feat_dim}]"
                           " features when lam > 0")
        if features is not None and self.feat_dim is None:
            raise CRLError("features given but this CRLLoss has no centers (feat_dim = None)")
        check_batch(logits, targets, self.num_classes, features, self.feat_dim)
        targets = targets.long()
        conf = target_confidence(logits, targets, upper=self.upper, detach=self.detach_targets)
        l_rce, l_lce, rce_branch = self._improved_relaxed(logits, targets, conf, epoch)
        stats = {"l_rce": l_rce.detach(), "l_lce": l_lce.detach(), "rce_branch": rce_branch,
                 "l_rcl": None, "l_ct": None, "rcl_branch": None}
        l_rcl = None
        if use_centers:
            centers = self.centers
            if center_scale is not None:
                centers = _CenterGradScale.apply(centers, center_scale)
            l_rcl, l_ct, rcl_branch = self._relaxed_center(features, targets, conf, centers, epoch)
            stats.update(l_rcl=l_rcl.detach(), l_ct=l_ct.detach(), rcl_branch=rcl_branch)
        self.last_stats = stats
        return l_rce, l_rcl

    def _improved_relaxed(self, logits, targets, conf, epoch):
        """ImpRelaxLoss (Eqs. 5-9): returns (L_rce, L_lce, branch)."""
        log_p_norm = F.log_softmax(normalize(logits, self.tau_rce), dim=1)       # Eq. 5
        l_lce = F.nll_loss(log_p_norm, targets)                                   # Eq. 6

        def soft() -> torch.Tensor:                                               # Eqs. 7-8
            p_tar = soft_target(conf, targets, self.num_classes)
            return soft_cross_entropy(log_p_norm, p_tar).mean()

        l_rce, branch = relaxed_objective(l_lce, self.alpha_rce, epoch, soft)    # Eq. 9
        return l_rce, l_lce, branch

    def _relaxed_center(self, features, targets, conf, centers, epoch):
        """Relaxed center loss (Algorithm 1 lines 5-18; Eq. 4 without its stray minus sign)."""
        batch = features.shape[0]
        q_n = normalize(features, self.tau_rcl)
        c_n = normalize(centers[targets], self.tau_rcl)
        dist = (q_n - c_n).pow(2).sum(dim=1)                                      # [B]
        l_ct = dist.sum() / (2 * batch)                                           # line 7

        def toward_line() -> torch.Tensor:                                        # lines 14-17
            t_y = conf
            t_o = 1.0 - t_y
            return (t_y * dist + t_o * q_n.pow(2).sum(dim=1)).sum() / (2 * batch)

        l_rcl, branch = relaxed_objective(l_ct, self.alpha_rcl, epoch, toward_line)
        return l_rcl, l_ct, branch

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"alpha_rce={self.alpha_rce}, alpha_rcl={self.alpha_rcl}, tau_rce={self.tau_rce}, "
                f"tau_rcl={self.tau_rcl}, lam={self.lam}, upper={self.upper}, "
                f"detach_targets={self.detach_targets}, center_update={self.center_update!r}")
