"""The original RelaxLoss defense (Chen et al., ICLR 2022; CRL paper Eq. 3; SPEC section 4)."""
from __future__ import annotations

from typing import Any

import torch

from crl.defenses.base import Defense, FitContext
from crl.defenses.crl import BranchMeans
from crl.errors import CRLError
from crl.losses.relaxloss import RelaxLoss, check_hparam
from crl.registry import DEFENSES

# The one place the RelaxLoss defaults live (initial values; a hyper-parameter search replaces
# them). Published: CIFAR-10 alpha 1 (ResNet) / 0.4 (VGG11-BN), CIFAR-100 3 / 0.5, upper 1.
RELAXLOSS_DEFAULTS: dict[str, Any] = {"alpha": 0.5, "upper": 1.0}


@DEFENSES.register("relaxloss")
class RelaxLossDefense(Defense):
    """RelaxLoss: even epoch |L_ce - alpha|; L_ce > alpha -> L_ce; else posterior flattening.

    extra_metrics(): per-epoch mean l_ce and fraction of batches in each branch
    (frac_ce_even/fit/relax); reset on each call.
    """

    name = "relaxloss"
    needs_features = False
    defaults = dict(RELAXLOSS_DEFAULTS)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        check_hparam("alpha", self.params["alpha"])
        check_hparam("upper", self.params["upper"], upper=1.0)
        self.relax_loss: RelaxLoss | None = None
        self._means = BranchMeans(("l_ce",), ("ce",))

    def prepare(self, ctx: FitContext) -> None:
        self.relax_loss = RelaxLoss(ctx.num_classes, **self.params)
        self._means.reset()

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        if self.relax_loss is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        value = self.relax_loss(logits, targets, epoch)
        stats = self.relax_loss.last_stats
        self._means.add({"l_ce": stats["l_ce"], "ce_branch": stats["branch"]})
        return value

    def extra_metrics(self) -> dict[str, float]:
        return self._means.means()
