"""Confidence penalty (Pereyra et al. 2017): cross-entropy minus beta times posterior entropy."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crl.defenses._common import Means, check_number
from crl.defenses.base import Defense
from crl.registry import DEFENSES


@DEFENSES.register("confidence_penalty")
class ConfidencePenalty(Defense):
    """L = CE(logits, y) - beta * mean_i H(softmax(logits_i)); penalises confident posteriors.

    extra_metrics(): the epoch's mean cross-entropy `l_ce` and mean entropy `entropy`.
    """

    name = "confidence_penalty"
    defaults: dict[str, Any] = {"beta": 0.1}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.params["beta"] = check_number(self.name, "beta", self.params["beta"], low=0.0)
        self._means = Means()

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        log_p = F.log_softmax(logits, dim=1)
        ce = F.nll_loss(log_p, targets)
        ent = -(log_p.exp() * log_p).sum(1).mean()
        self._means.add(l_ce=ce.detach(), entropy=ent.detach())
        return ce - self.params["beta"] * ent

    def extra_metrics(self) -> dict[str, float]:
        return self._means.pop()
