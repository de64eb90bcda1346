"""The original RelaxLoss defense (Chen et al., ICLR 2022; CRL paper Eq. 3; SPEC section 4)."""
from __future__ import annotations

from typing import ClassVar

import torch

from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import LogsMeans
from crl.defenses.base import Defense, Step, TrainContext
from crl.losses.relaxloss import LossStats, relaxloss_batched


@DEFENSES.register("relaxloss")
class RelaxLossDefense(LogsMeans, Defense):
    """RelaxLoss: even epoch |L_ce - alpha|; L_ce > alpha -> L_ce; else posterior flattening.
    Epochs' parity as Chen et al.'s code counts them, from 0: crl's epochs 1, 3, 5, ... are
    their even ones (crl.losses.relaxloss.relaxloss_epoch).

    end_epoch() metrics: the epoch's mean l_ce and the share of steps in each branch
    (frac_ce_even/fit/relax).
    """

    description: ClassVar[str] = ("RelaxLoss: keeps the training loss near a target level alpha "
                                  "(Chen et al., ICLR 2022)")

    # Published: CIFAR-10 alpha 1 (ResNet) / 0.4 (VGG11-BN), CIFAR-100 3 / 0.5, upper 1.
    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("alpha", 0.5, float, low=0.0, search=(0.02, 1.2, "log"),
              help="target level of the training cross-entropy"),
        Param("upper", 1.0, float, low=0.0, high=1.0, help="cap on p[y] in the soft target"),
    )

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        """RelaxLoss per model (relaxloss_batched: each model takes its own branch, Eq. 3)."""
        means, stats = self._means(), LossStats()
        value = relaxloss_batched(step.logits, step.y, self.params["alpha"], step.epoch,
                                  upper=self.params["upper"], validate=False, stats=stats)
        means.add(l_ce=stats["l_ce"])
        means.add_branch("ce", stats.code("branch"))
        return value
