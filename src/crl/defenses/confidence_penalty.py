"""Confidence penalty (Pereyra et al. 2017): cross-entropy minus beta times posterior entropy."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from crl.defenses._common import EpochMeans
from crl.defenses.base import Defense, EpochEnd, Step, TrainContext
from crl.params import Param, ParamSpec
from crl.registry import DEFENSES


@DEFENSES.register("confidence_penalty")
class ConfidencePenalty(Defense):
    """L = CE(logits, y) - beta * mean_i H(softmax(logits_i)); penalises confident posteriors.

    end_epoch() metrics: the epoch's mean cross-entropy `l_ce` and mean entropy `entropy`.
    """

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("beta", 0.1, float, low=0.0, search=(0.01, 2.0, "log"),
              help="weight of the entropy bonus"),
    )

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._means = EpochMeans()

    def prepare(self, ctx: TrainContext) -> None:
        self._means.reset()

    def loss(self, ctx: TrainContext, step: Step) -> torch.Tensor:
        log_p = F.log_softmax(step.logits, dim=1)
        ce = F.nll_loss(log_p, step.y)
        ent = -(log_p.exp() * log_p).sum(1).mean()
        self._means.add(l_ce=ce, entropy=ent)
        return ce - self.params["beta"] * ent

    def end_epoch(self, ctx: TrainContext, epoch: int) -> EpochEnd:
        return EpochEnd(metrics=self._means.pop())
