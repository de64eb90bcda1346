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

`crl_batched` is the same loss for K models at once (logits [K, B, C], features [K, B, D],
centers [K, C, D] -> loss [K], alphas shared or per model): both relaxed terms are branch-free
(see `crl.losses.relaxloss`), so each model takes its own branch without a device sync, and the
centers' gradient is rescaled the same way, model by model.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.losses.relaxloss import (
    LossStats,
    check_batch,
    check_epoch,
    check_hparam,
    check_num_classes,
    check_shapes,
    nll,
    per_model,
    relaxed_objective,
    soft_cross_entropy,
    soft_target,
    target_confidence,
)

CENTER_LR = 1e-3               # tau_c, the one value the paper fixes (held constant)
AUTHORS_MOMENTUM = 0.9         # center optimizer of the authors' code
AUTHORS_WEIGHT_DECAY = 5e-4
CENTER_UPDATES = ("paper", "authors")
Alpha = float | Sequence[float] | torch.Tensor


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


def _center_scaled(centers: torch.Tensor, lam: float, center_update: str) -> torch.Tensor:
    """The centers as the total loss sees them: "paper" divides their gradient by lam."""
    if center_update == "paper":
        return _CenterGradScale.apply(centers, 1.0 / lam)
    return centers


def _check_shared_params(*, tau_rce: float, tau_rcl: float, lam: float, upper: float,
                         detach_targets: bool, center_update: str, owner: str) -> dict:
    """The hyper-parameters every model shares (all but the alphas), checked."""
    out = {name: check_hparam(name, value, owner=owner) for name, value in
           (("tau_rce", tau_rce), ("tau_rcl", tau_rcl), ("lam", lam))}
    out["upper"] = check_hparam("upper", upper, upper=1.0, owner=owner)
    if not isinstance(detach_targets, bool):
        raise CRLError(f"{owner}.detach_targets = {detach_targets!r}: expected true or false")
    out["detach_targets"] = detach_targets
    if center_update not in CENTER_UPDATES:
        raise CRLError(f"{owner}.center_update = {center_update!r}: expected one of: "
                       f"{', '.join(CENTER_UPDATES)}")
    out["center_update"] = center_update
    return out


def check_crl_params(*, alpha_rce: float, alpha_rcl: float, tau_rce: float, tau_rcl: float,
                     lam: float, upper: float = 1.0, detach_targets: bool = False,
                     center_update: str = "paper", owner: str = "crl") -> dict:
    """Validate CRL hyper-parameters (CRLError on a bad one); returns them normalised."""
    out = {"alpha_rce": check_hparam("alpha_rce", alpha_rce, owner=owner),
           "alpha_rcl": check_hparam("alpha_rcl", alpha_rcl, owner=owner)}
    out.update(_check_shared_params(tau_rce=tau_rce, tau_rcl=tau_rcl, lam=lam, upper=upper,
                                    detach_targets=detach_targets, center_update=center_update,
                                    owner=owner))
    return out


# --- the two terms (any leading model axes; inputs already checked) --------------------------
def _improved_relaxed(logits, targets, conf, epoch, alpha, hp, stats):
    """ImpRelaxLoss (Eqs. 5-9) per model: L_rce [...]."""
    log_p_norm = F.log_softmax(normalize(logits, hp["tau_rce"]), dim=-1)      # Eq. 5
    l_lce = nll(log_p_norm, targets).mean(dim=-1)                             # Eq. 6
    p_tar = soft_target(conf, targets, logits.shape[-1])                      # Eq. 7
    l_sce = soft_cross_entropy(log_p_norm, p_tar).mean(dim=-1)                # Eq. 8
    stats.put("l_lce", l_lce)
    stats.put_branch("rce_branch", l_lce, alpha, epoch)
    return relaxed_objective(l_lce, alpha, epoch, l_sce)                      # Eq. 9


def _relaxed_center(features, targets, conf, centers, epoch, alpha, hp, stats):
    """Relaxed center loss (Algorithm 1 lines 5-18; Eq. 4 without its stray minus sign)."""
    batch = features.shape[-2]
    index = targets.unsqueeze(-1).expand(*targets.shape, centers.shape[-1])
    q_n = normalize(features, hp["tau_rcl"])
    c_n = normalize(centers, hp["tau_rcl"]).gather(-2, index)                 # c_y per sample
    dist = (q_n - c_n).pow(2).sum(dim=-1)                                     # [..., B]
    l_ct = dist.sum(dim=-1) / (2 * batch)                                     # line 7
    t_y = conf                                                                # lines 14-17
    toward_line = (t_y * dist + (1.0 - t_y) * q_n.pow(2).sum(dim=-1)).sum(dim=-1) / (2 * batch)
    stats.put("l_ct", l_ct)
    stats.put_branch("rcl_branch", l_ct, alpha, epoch)
    return relaxed_objective(l_ct, alpha, epoch, toward_line)


def _crl_terms(logits, features, targets, centers, epoch, alpha_rce, alpha_rcl, hp,
               stats: LossStats) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L_rce, L_rcl) per model; L_rcl is None when `centers` is None. Fills `stats`."""
    stats.clear()
    targets = targets.long()
    conf = target_confidence(logits, targets, upper=hp["upper"], detach=hp["detach_targets"])
    l_rce = _improved_relaxed(logits, targets, conf, epoch, alpha_rce, hp, stats)
    stats.put("l_rce", l_rce)
    if centers is None:
        l_rcl = None
        stats.put("l_ct", None)
        stats.put("rcl_branch", None)
    else:
        l_rcl = _relaxed_center(features, targets, conf, centers, epoch, alpha_rcl, hp, stats)
    stats.put("l_rcl", l_rcl)
    return l_rce, l_rcl


# --- K models at once ------------------------------------------------------------------------
def _check_centers(centers: object, models: int, num_classes: int) -> int:
    """centers must be a float tensor [K, C, D], D >= 1; returns D."""
    if not isinstance(centers, torch.Tensor) or centers.dim() != 3 \
            or tuple(centers.shape[:2]) != (models, num_classes) or centers.shape[2] < 1 \
            or not centers.is_floating_point():
        shape = tuple(centers.shape) if isinstance(centers, torch.Tensor) else centers
        raise CRLError(f"centers = {shape!r}; expected a float tensor of shape "
                       f"[{models}, {num_classes}, D] when lam > 0 (class centers per model)")
    return int(centers.shape[2])


def crl_batched(logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
                centers: torch.Tensor | None, epoch: int, *, alpha_rce: Alpha, alpha_rcl: Alpha,
                tau_rce: float, tau_rcl: float, lam: float, upper: float = 1.0,
                detach_targets: bool = False, center_update: str = "paper",
                validate: bool = True, stats: LossStats | None = None) -> torch.Tensor:
    """L = L_rce + lam * L_rcl of K models at once -> loss [K] (sum it, then backward).

    logits [K, B, C], features [K, B, D], targets [K, B], centers [K, C, D]; `alpha_rce` and
    `alpha_rcl` are one number or K (a sequence or a [K] tensor). Values and gradients equal K
    calls of `CRLLoss.forward`, centers' gradient included ("paper": grad_c L_rcl per model).
    lam == 0: features and centers are not used (may be None). `validate=False` skips the
    value checks, the one step that waits for the device. `stats`, if given, is filled like
    `CRLLoss.last_stats` with [K] tensors.
    """
    epoch = check_epoch(epoch)
    hp = _check_shared_params(tau_rce=tau_rce, tau_rcl=tau_rcl, lam=lam, upper=upper,
                              detach_targets=detach_targets, center_update=center_update,
                              owner="crl")
    check_shapes(logits, targets, None, None, None, batched=True)
    models, classes = logits.shape[0], logits.shape[-1]
    a_rce, extra = per_model("crl", "alpha_rce", alpha_rce, models, logits)
    a_rcl, extra_rcl = per_model("crl", "alpha_rcl", alpha_rcl, models, logits)
    feat_dim = None
    if hp["lam"] == 0:
        features = centers = None
    else:
        feat_dim = _check_centers(centers, models, classes)
        if features is None:
            raise CRLError(f"features = None with lam = {lam}; expected "
                           f"[{models}, B, {feat_dim}] features when lam > 0")
    check_batch(logits, targets, classes, features, feat_dim, batched=True, validate=validate,
                extra=extra + extra_rcl)
    if centers is not None:
        centers = _center_scaled(centers, hp["lam"], hp["center_update"])
    l_rce, l_rcl = _crl_terms(logits, features, targets, centers, epoch, a_rce, a_rcl, hp,
                              LossStats() if stats is None else stats)
    return l_rce if l_rcl is None else l_rce + hp["lam"] * l_rcl


def initial_centers(num_classes: int, feat_dim: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A model's class centers before training: [num_classes, feat_dim] standard normal, drawn
    from `generator` (on its device) if given."""
    device = generator.device if generator is not None else None
    return torch.randn(num_classes, feat_dim, generator=generator, device=device)


def center_optimizer(centers: torch.Tensor, center_update: str) -> torch.optim.Optimizer:
    """The centers' own optimizer (of any shape, e.g. [K, C, D]: elementwise, so one optimizer
    is K): SGD, lr 0.001 constant ("authors": momentum 0.9, weight decay 5e-4)."""
    if center_update == "authors":
        return torch.optim.SGD([centers], lr=CENTER_LR, momentum=AUTHORS_MOMENTUM,
                               weight_decay=AUTHORS_WEIGHT_DECAY)
    return torch.optim.SGD([centers], lr=CENTER_LR)


# --- one model -------------------------------------------------------------------------------
class CRLLoss(nn.Module):
    """L = L_rce + lam * L_rcl (Algorithm 1 line 22) with learnable class centers.

    `centers` [num_classes, feat_dim] are initialised standard normal (from `generator` if
    given). `feat_dim=None` is allowed only when lam == 0 (no centers). After each call,
    `last_stats` (a `LossStats`: tensors, read without a sync until someone reads them) holds
    the batch's diagnostics: l_rce, l_rcl, l_lce, l_ct, rce_branch, rcl_branch ("even", "fit"
    or "relax"; None where not computed).
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
        self._hp = hp
        self.alpha_rce, self.alpha_rcl = hp["alpha_rce"], hp["alpha_rcl"]
        self.tau_rce, self.tau_rcl, self.lam = hp["tau_rce"], hp["tau_rcl"], hp["lam"]
        self.upper, self.detach_targets = hp["upper"], hp["detach_targets"]
        self.center_update = hp["center_update"]
        self.feat_dim = self._check_feat_dim(feat_dim)
        if self.feat_dim is None:
            self.register_parameter("centers", None)
        else:
            self.centers = nn.Parameter(initial_centers(self.num_classes, self.feat_dim,
                                                        generator))
        self.last_stats = LossStats()

    def _check_feat_dim(self, feat_dim: object) -> int | None:
        if feat_dim is None and self.lam > 0:
            raise CRLError(f"feat_dim = None with lam = {self.lam}; expected an int >= 1 "
                           "when lam > 0")
        if feat_dim is not None and (isinstance(feat_dim, bool)
                                     or not isinstance(feat_dim, numbers.Integral) or feat_dim < 1):
            raise CRLError(f"feat_dim = {feat_dim!r}; expected an int >= 1")
        return None if feat_dim is None else int(feat_dim)

    # --- public API ----------------------------------------------------------------------------
    def make_center_optimizer(self) -> torch.optim.Optimizer:
        """The centers' own optimizer: SGD, lr 0.001 constant ("authors": momentum 0.9, wd 5e-4).

        Create it after moving the module to its device.
        """
        if self.centers is None:
            raise CRLError("this CRLLoss has no centers (feat_dim = None); expected a feat_dim")
        return center_optimizer(self.centers, self.center_update)

    def forward(self, logits: torch.Tensor, features: torch.Tensor | None,
                targets: torch.Tensor, epoch: int) -> torch.Tensor:
        """L = L_rce + lam * L_rcl (Algorithm 1 line 22); centers' gradient as in the module doc."""
        l_rce, l_rcl = self._terms(logits, features, targets, epoch, self.lam > 0, scaled=True)
        if l_rcl is None:
            return l_rce
        return l_rce + self.lam * l_rcl

    def terms(self, logits: torch.Tensor, features: torch.Tensor | None,
              targets: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_rce, L_rcl), plain (no gradient rescaling); L_rcl is 0 when features is None."""
        use_centers = features is not None and self.centers is not None
        l_rce, l_rcl = self._terms(logits, features, targets, epoch, use_centers, scaled=False)
        if l_rcl is None:
            l_rcl = l_rce.new_zeros(())
        return l_rce, l_rcl

    def _terms(self, logits, features, targets, epoch, use_centers: bool, scaled: bool):
        epoch = check_epoch(epoch)
        if features is None and self.lam > 0:
            raise CRLError(f"features = None with lam = {self.lam}; expected [B, {self.feat_dim}]"
                           " features when lam > 0")
        if features is not None and self.feat_dim is None:
            raise CRLError("features given but this CRLLoss has no centers (feat_dim = None)")
        check_batch(logits, targets, self.num_classes, features, self.feat_dim)
        centers = self.centers if use_centers else None
        if centers is not None and scaled:
            centers = _center_scaled(centers, self.lam, self.center_update)
        stats = LossStats()
        out = _crl_terms(logits, features, targets, centers, epoch, self.alpha_rce,
                         self.alpha_rcl, self._hp, stats)
        self.last_stats = stats
        return out

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, "
                f"alpha_rce={self.alpha_rce}, alpha_rcl={self.alpha_rcl}, tau_rce={self.tau_rce}, "
                f"tau_rcl={self.tau_rcl}, lam={self.lam}, upper={self.upper}, "
                f"detach_targets={self.detach_targets}, center_update={self.center_update!r}")
