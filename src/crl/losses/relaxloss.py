"""RelaxLoss (Chen et al., ICLR 2022; CRL paper Eq. 3) and the pieces CRL shares with it.

Shared pieces (used by `crl.losses.crl` too, so that neither loss copies the other):
  - `relaxed_objective`: the three-branch relaxed policy of Eq. 3 / Eq. 9 / Algorithm 1
    lines 9-18 (even epoch -> |L - alpha|; L > alpha -> L; else a relaxed term);
  - `target_confidence` and `soft_target`: the soft label of Eq. 7;
  - `soft_cross_entropy`: the per-sample soft cross-entropy of Eq. 8;
  - input checks that raise a one-line `CRLError`.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from crl.errors import CRLError

# Branch names reported by the losses' diagnostics.
EVEN, FIT, RELAX = "even", "fit", "relax"
BRANCHES = (EVEN, FIT, RELAX)


# --- input checks ----------------------------------------------------------------------------
def check_hparam(name: str, value: object, *, upper: float | None = None) -> float:
    """Return `value` as a float if it is a finite number >= 0 (and <= `upper`), else CRLError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise CRLError(f"{name} = {value!r}; expected a finite number >= 0")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise CRLError(f"{name} = {value!r}; expected a number {bound}")
    return float(value)


def check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 2:
        raise CRLError(f"num_classes = {num_classes!r}; expected an int >= 2")
    return int(num_classes)


def check_epoch(epoch: object) -> int:
    """Epochs count from 1 (Algorithm 1 line 2)."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 1:
        raise CRLError(f"epoch = {epoch!r}; expected an int >= 1 (epochs count from 1)")
    return int(epoch)


def _shape(t: object) -> object:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_batch(logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                features: torch.Tensor | None = None, feat_dim: int | None = None) -> None:
    """Shapes, dtypes, finiteness and label range of one mini-batch (one device sync)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 \
            or logits.shape[1] != num_classes or logits.shape[0] == 0:
        raise CRLError(f"logits have shape {_shape(logits)}; expected [B, {num_classes}], B >= 1")
    if not logits.is_floating_point():
        raise CRLError(f"logits have dtype {logits.dtype}; expected a floating dtype")
    batch = logits.shape[0]
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (batch,):
        raise CRLError(f"targets have shape {_shape(targets)}; expected [{batch}] (one per row)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise CRLError(f"targets have dtype {targets.dtype}; expected an integer dtype")
    checks = [torch.isfinite(logits).all(), (targets >= 0).all(), (targets < num_classes).all()]
    if features is not None:
        if not isinstance(features, torch.Tensor) or features.dim() != 2 \
                or tuple(features.shape) != (batch, feat_dim):
            raise CRLError(f"features have shape {_shape(features)}; "
                           f"expected [{batch}, {feat_dim}]")
        if not features.is_floating_point():
            raise CRLError(f"features have dtype {features.dtype}; expected a floating dtype")
        checks.append(torch.isfinite(features).all())
    if bool(torch.stack(checks).all()):
        return
    if not bool(checks[0]):
        raise CRLError("logits contain NaN or inf; expected finite values")
    if not bool(checks[1] & checks[2]):
        lo, hi = int(targets.min()), int(targets.max())
        raise CRLError(f"targets range over [{lo}, {hi}]; "
                       f"expected labels in [0, {num_classes - 1}]")
    raise CRLError("features contain NaN or inf; expected finite values")


# --- shared formula pieces -------------------------------------------------------------------
def relaxed_objective(level: torch.Tensor, alpha: float, epoch: int,
                      relaxed: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, str]:
    """The relaxed policy shared by Eq. 3, Eq. 9 and Algorithm 1 lines 9-18.

    `level` is the batch-mean loss that decides the branch (chosen once per mini-batch):
    even epoch -> |level - alpha|; else level > alpha -> level; else `relaxed()` (called only
    then). Returns (value, branch name).
    """
    if epoch % 2 == 0:
        return (level - alpha).abs(), EVEN
    if float(level.detach()) > alpha:
        return level, FIT
    return relaxed(), RELAX


def target_confidence(logits: torch.Tensor, targets: torch.Tensor, *, upper: float = 1.0,
                      detach: bool = False) -> torch.Tensor:
    """p[y] = softmax(logits)[y] clamped at `upper`, per sample [B] (the p_y of Eq. 7).

    Gradient flows through it unless `detach`.
    """
    p_y = F.softmax(logits, dim=1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    p_y = p_y.clamp(max=upper)
    return p_y.detach() if detach else p_y


def soft_target(confidence: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 7: p_tar[y] = p_y and p_tar[i != y] = (1 - p_y) / (C - 1); returns [B, C]."""
    onehot = F.one_hot(targets.long(), num_classes).to(confidence.dtype)
    rest = (1.0 - confidence) / (num_classes - 1)
    return onehot * confidence.unsqueeze(1) + (1.0 - onehot) * rest.unsqueeze(1)


def soft_cross_entropy(log_probs: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Per-sample soft cross-entropy -sum_i t_i log p_i (the summand of Eq. 8); returns [B]."""
    return -(soft_targets * log_probs).sum(dim=1)


# --- the original RelaxLoss -------------------------------------------------------------------
class RelaxLoss(nn.Module):
    """The original RelaxLoss (Chen et al. 2022; CRL paper Eq. 3; SPEC section 4).

    even epoch -> |L_ce - alpha|; else L_ce > alpha -> L_ce; else posterior flattening
    mean_j[(1 - correct_j) * soft_ce_j - ce_j] with the Eq. 7 soft target built from p[y]
    clamped at `upper` (gradient flowing), on the plain logits.
    `last_stats` holds the last batch's diagnostics: l_ce (detached) and the branch taken.
    """

    def __init__(self, num_classes: int, *, alpha: float, upper: float = 1.0) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.alpha = check_hparam("alpha", alpha)
        self.upper = check_hparam("upper", upper, upper=1.0)
        self.last_stats: dict[str, object] = {}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        epoch = check_epoch(epoch)
        check_batch(logits, targets, self.num_classes)
        targets = targets.long()
        ce = F.cross_entropy(logits, targets, reduction="none")
        l_ce = ce.mean()

        def flatten() -> torch.Tensor:
            correct = (logits.argmax(dim=1) == targets).to(logits.dtype)
            conf = target_confidence(logits, targets, upper=self.upper)
            soft = soft_cross_entropy(F.log_softmax(logits, dim=1),
                                      soft_target(conf, targets, self.num_classes))
            return ((1.0 - correct) * soft - ce).mean()

        loss, branch = relaxed_objective(l_ce, self.alpha, epoch, flatten)
        self.last_stats = {"l_ce": l_ce.detach(), "branch": branch}
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, upper={self.upper}"
