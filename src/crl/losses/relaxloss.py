"""RelaxLoss (Chen et al., ICLR 2022; CRL paper Eq. 3) and the pieces CRL shares with it.

Shared pieces (used by `crl.losses.crl` too, so that neither loss copies the other):
  - `relaxed_objective`: the three-branch relaxed policy of Eq. 3 / Eq. 9 / Algorithm 1
    lines 9-18 (even epoch -> |L - alpha|; L > alpha -> L; else a relaxed term);
  - `target_confidence` and `soft_target`: the soft label of Eq. 7;
  - `soft_cross_entropy`: the per-sample soft cross-entropy of Eq. 8;
  - `LossStats`: a loss's diagnostics, kept on the device until someone reads them;
  - input checks that raise a one-line `CRLError`.

Branch-free: every branch's value is computed and `torch.where` picks one per model, so nothing
in a forward pass waits for the device (no `.item()`), and one call can evaluate K models at
once. Every formula works on a batch axis B and a class axis C at the end and any leading axes
before them: `[B, C]` for one model, `[K, B, C]` for K models (`relaxloss_batched`), each model
taking its own branch.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.core.params import check_value

# Branch names reported by the losses' diagnostics; a branch code is an index into BRANCHES.
EVEN, FIT, RELAX = "even", "fit", "relax"
BRANCHES = (EVEN, FIT, RELAX)

# A deferred value check: (0-d bool tensor that must be True, message if it is not).
Check = tuple[torch.Tensor, Callable[[], str]]


# --- input checks ----------------------------------------------------------------------------
def check_hparam(name: str, value: object, *, upper: float | None = None,
                 owner: str = "loss") -> float:
    """`value` as a float if it is a finite number >= 0 (and <= `upper`), else CRLError."""
    return check_value(owner, name, value, kind=float, low=0, high=upper)


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


def _dims(*sizes: object) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def per_model(owner: str, name: str, value: object, models: int,
              like: torch.Tensor) -> tuple[float | torch.Tensor, list[Check]]:
    """A hyper-parameter >= 0 given once (a number) or per model (K numbers: a sequence or a
    1-d float tensor). Returns a float or a [K] tensor on `like`'s device and dtype, and the
    value checks still to run on the device (for a tensor)."""
    if isinstance(value, torch.Tensor):
        if tuple(value.shape) != (models,) or not value.is_floating_point():
            raise CRLError(f"{owner}.{name} has shape {_shape(value)} and dtype {value.dtype}; "
                           f"expected a number or a float tensor of shape [{models}]")
        t = value.detach().to(device=like.device, dtype=like.dtype)
        ok = (torch.isfinite(t) & (t >= 0)).all()
        return t, [(ok, lambda: f"{owner}.{name} = {t.tolist()}: expected numbers >= 0")]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != models:
            raise CRLError(f"{owner}.{name} has {len(value)} values; expected a number or "
                           f"{models} numbers (one per model)")
        values = [check_hparam(f"{name}[{i}]", v, owner=owner) for i, v in enumerate(value)]
        return torch.tensor(values, dtype=like.dtype, device=like.device), []
    return check_hparam(name, value, owner=owner), []


def check_shapes(logits: object, targets: object, features: object, feat_dim: int | None,
                 num_classes: int | None, batched: bool) -> None:
    """Shapes and dtypes only (no device work): [B, C] / [B] / [B, D], or with a leading K."""
    classes = "C" if num_classes is None else num_classes
    want = (_dims("K", "B", classes) + ", K, B >= 1") if batched else \
        (_dims("B", classes) + ", B >= 1")
    if not isinstance(logits, torch.Tensor) or logits.dim() != (3 if batched else 2) \
            or logits.numel() == 0 or logits.shape[-1] != (num_classes or logits.shape[-1]):
        raise CRLError(f"logits have shape {_shape(logits)}; expected {want}")
    if not logits.is_floating_point():
        raise CRLError(f"logits have dtype {logits.dtype}; expected a floating dtype")
    if num_classes is None:
        check_num_classes(logits.shape[-1])
    lead = tuple(logits.shape[:-1])
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != lead:
        raise CRLError(f"targets have shape {_shape(targets)}; expected {_dims(*lead)} "
                       "(one per row of logits)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise CRLError(f"targets have dtype {targets.dtype}; expected an integer dtype")
    if features is None:
        return
    if not isinstance(features, torch.Tensor) or tuple(features.shape) != lead + (feat_dim,):
        raise CRLError(f"features have shape {_shape(features)}; "
                       f"expected {_dims(*lead, feat_dim)}")
    if not features.is_floating_point():
        raise CRLError(f"features have dtype {features.dtype}; expected a floating dtype")


def run_checks(checks: list[Check]) -> None:
    """All deferred value checks with one device sync; CRLError naming the first that failed."""
    if not checks or bool(torch.stack([ok for ok, _ in checks]).all()):
        return
    for ok, message in checks:
        if not bool(ok):
            raise CRLError(message())


def check_batch(logits: torch.Tensor, targets: torch.Tensor, num_classes: int | None,
                features: torch.Tensor | None = None, feat_dim: int | None = None, *,
                batched: bool = False, validate: bool = True,
                extra: Sequence[Check] = ()) -> None:
    """Shapes and dtypes of one mini-batch (free), then, if `validate`, its values (finite,
    labels in range) and the `extra` checks with one device sync. `num_classes` None: taken
    from the logits (>= 2)."""
    check_shapes(logits, targets, features, feat_dim, num_classes, batched)
    if not validate:
        return
    classes = logits.shape[-1]

    def label_range() -> str:
        lo, hi = int(targets.min()), int(targets.max())
        return f"targets range over [{lo}, {hi}]; expected labels in [0, {classes - 1}]"

    checks: list[Check] = [
        (torch.isfinite(logits).all(), lambda: "logits contain NaN or inf; expected finite values"),
        (((targets >= 0) & (targets < classes)).all(), label_range),
    ]
    if features is not None:
        checks.append((torch.isfinite(features).all(),
                       lambda: "features contain NaN or inf; expected finite values"))
    run_checks(checks + list(extra))


# --- diagnostics -----------------------------------------------------------------------------
class _Branch(NamedTuple):
    """What decides a relaxed branch: the batch-mean level, alpha and the epoch."""

    level: torch.Tensor
    alpha: float | torch.Tensor
    epoch: int


class LossStats(Mapping):
    """A loss's diagnostics for the last batch, kept as detached tensors on the loss's device.

    Value entries (l_ce, l_rce, l_ct, ...) are tensors: 0-d for one model, [K] for K models (or
    None where not computed). Branch entries (branch, rce_branch, rcl_branch) read as the branch
    name ("even", "fit", "relax"; a tuple of K names for K models); reading one copies to the
    host. `code(key)` gives the branch as indices into BRANCHES without leaving the device.
    Nothing is synchronised unless an entry is read.
    """

    def __init__(self) -> None:
        self._entries: dict[str, torch.Tensor | _Branch | None] = {}

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: str, value: torch.Tensor | None) -> None:
        self._entries[key] = None if value is None else value.detach()

    def put_branch(self, key: str, level: torch.Tensor, alpha: float | torch.Tensor,
                   epoch: int) -> None:
        self._entries[key] = _Branch(level.detach(), alpha, epoch)

    def code(self, key: str) -> torch.Tensor | None:
        """Branch `key` as an int64 tensor of indices into BRANCHES (None if not computed)."""
        entry = self._entries[key]
        if entry is None:
            return None
        if not isinstance(entry, _Branch):
            raise CRLError(f"stats entry {key!r} is a value; expected a branch entry")
        return branch_code(*entry)

    def __getitem__(self, key: str) -> object:
        entry = self._entries[key]
        if not isinstance(entry, _Branch):
            return entry
        codes = branch_code(*entry)
        if codes.dim() == 0:
            return BRANCHES[int(codes)]
        return tuple(BRANCHES[i] for i in codes.tolist())

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


# --- shared formula pieces -------------------------------------------------------------------
def _even(epoch: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, epoch % 2 == 0, dtype=torch.bool)


def branch_code(level: torch.Tensor, alpha: float | torch.Tensor, epoch: int) -> torch.Tensor:
    """The branch `relaxed_objective` takes, as indices into BRANCHES (same shape as level)."""
    fit = torch.where(level > alpha, BRANCHES.index(FIT), BRANCHES.index(RELAX))
    return torch.where(_even(epoch, level), BRANCHES.index(EVEN), fit)


def relaxed_objective(level: torch.Tensor, alpha: float | torch.Tensor, epoch: int,
                      relaxed: torch.Tensor) -> torch.Tensor:
    """The relaxed policy shared by Eq. 3, Eq. 9 and Algorithm 1 lines 9-18, per model.

    `level` is the batch-mean loss that decides the branch (once per mini-batch and model):
    even `epoch` (as the caller counts it: CRL from 1, RelaxLoss from 0) -> |level - alpha|;
    else level > alpha -> level; else `relaxed`. All three are computed and `torch.where`
    selects, so the gradient is exactly the chosen branch's.
    """
    fit_or_relax = torch.where(level > alpha, level, relaxed)
    return torch.where(_even(epoch, level), (level - alpha).abs(), fit_or_relax)


def target_confidence(logits: torch.Tensor, targets: torch.Tensor, *, upper: float = 1.0,
                      detach: bool = False) -> torch.Tensor:
    """p[y] = softmax(logits)[y] clamped at `upper`, per sample [..., B] (the p_y of Eq. 7).

    Gradient flows through it unless `detach`.
    """
    p_y = F.softmax(logits, dim=-1).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p_y = p_y.clamp(max=upper)
    return p_y.detach() if detach else p_y


def soft_target(confidence: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 7: p_tar[y] = p_y and p_tar[i != y] = (1 - p_y) / (C - 1); returns [..., B, C]."""
    classes = torch.arange(num_classes, device=targets.device)
    onehot = (targets.unsqueeze(-1) == classes).to(confidence.dtype)      # no host check
    rest = (1.0 - confidence) / (num_classes - 1)
    return onehot * confidence.unsqueeze(-1) + (1.0 - onehot) * rest.unsqueeze(-1)


def soft_cross_entropy(log_probs: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Per-sample soft cross-entropy -sum_i t_i log p_i (the summand of Eq. 8); returns [..., B]."""
    return -(soft_targets * log_probs).sum(dim=-1)


def nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample -log p[y] for log-probabilities [..., B, C]; returns [..., B]."""
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


# --- the original RelaxLoss -------------------------------------------------------------------
def relaxloss_epoch(epoch: int) -> int:
    """The epoch index RelaxLoss's parity is taken on: Chen et al.'s code counts epochs from 0
    (`for epoch in range(start_epoch, num_epochs)`, start_epoch 0; `epoch % 2 == 0` takes
    |L_ce - alpha|), so crl's epoch e (counted from 1) is their e - 1 and crl's first epoch is
    their even epoch 0. CRL keeps its paper's count (Algorithm 1: epochs 1..E)."""
    return epoch - 1


def _relaxloss(logits: torch.Tensor, targets: torch.Tensor, alpha: float | torch.Tensor,
               epoch: int, upper: float, stats: LossStats | None) -> torch.Tensor:
    """RelaxLoss per model ([..., B, C] -> [...]) on checked inputs; fills `stats` if given."""
    targets = targets.long()
    log_p = F.log_softmax(logits, dim=-1)
    ce = nll(log_p, targets)
    l_ce = ce.mean(dim=-1)
    correct = (logits.argmax(dim=-1) == targets).to(logits.dtype)
    conf = target_confidence(logits, targets, upper=upper)
    soft = soft_cross_entropy(log_p, soft_target(conf, targets, logits.shape[-1]))
    flatten = ((1.0 - correct) * soft - ce).mean(dim=-1)
    parity_epoch = relaxloss_epoch(epoch)
    if stats is not None:
        stats.clear()
        stats.put("l_ce", l_ce)
        stats.put_branch("branch", l_ce, alpha, parity_epoch)
    return relaxed_objective(l_ce, alpha, parity_epoch, flatten)


def relaxloss_batched(logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float | Sequence[float] | torch.Tensor, epoch: int, *,
                      upper: float = 1.0, validate: bool = True,
                      stats: LossStats | None = None) -> torch.Tensor:
    """RelaxLoss of K models at once: logits [K, B, C], targets [K, B] -> loss [K].

    `alpha` is one number or K (a sequence or a [K] tensor); each model takes its own branch,
    exactly as K calls of `RelaxLoss`. `validate=False` skips the value checks (finite logits,
    labels in range, alpha >= 0 for a tensor), the one step that waits for the device.
    `stats`, if given, is filled like `RelaxLoss.last_stats` with [K] tensors.
    """
    epoch = check_epoch(epoch)
    upper = check_hparam("upper", upper, upper=1.0, owner="relaxloss")
    check_shapes(logits, targets, None, None, None, batched=True)
    alpha, extra = per_model("relaxloss", "alpha", alpha, logits.shape[0], logits)
    check_batch(logits, targets, None, batched=True, validate=validate, extra=extra)
    return _relaxloss(logits, targets, alpha, epoch, upper, stats)


class RelaxLoss(nn.Module):
    """The original RelaxLoss (Chen et al. 2022; CRL paper Eq. 3; SPEC section 4).

    even epoch (counted from 0 as Chen et al.'s code does: crl's epochs 1, 3, 5, ...; see
    `relaxloss_epoch`) -> |L_ce - alpha|; else L_ce > alpha -> L_ce; else posterior flattening
    mean_j[(1 - correct_j) * soft_ce_j - ce_j] with the Eq. 7 soft target built from p[y]
    clamped at `upper` (gradient flowing), on the plain logits.
    `last_stats` (a `LossStats`) holds the last batch's diagnostics: l_ce and the branch taken.
    """

    def __init__(self, num_classes: int, *, alpha: float, upper: float = 1.0) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.alpha = check_hparam("alpha", alpha, owner="relaxloss")
        self.upper = check_hparam("upper", upper, upper=1.0, owner="relaxloss")
        self.last_stats = LossStats()

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, epoch: int) -> torch.Tensor:
        epoch = check_epoch(epoch)
        check_batch(logits, targets, self.num_classes)
        stats = LossStats()
        loss = _relaxloss(logits, targets, self.alpha, epoch, self.upper, stats)
        self.last_stats = stats
        return loss

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha}, upper={self.upper}"
