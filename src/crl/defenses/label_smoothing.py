"""Label smoothing (Szegedy et al. 2016; studied by Müller et al. 2019): soft one-hot targets."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crl.defenses._common import check_number
from crl.defenses.base import Defense
from crl.registry import DEFENSES


@DEFENSES.register("label_smoothing")
class LabelSmoothing(Defense):
    """Cross-entropy against (1 - epsilon) * one_hot(y) + epsilon / C (uniform mass on all C)."""

    name = "label_smoothing"
    defaults: dict[str, Any] = {"epsilon": 0.1}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.params["epsilon"] = check_number(self.name, "epsilon", self.params["epsilon"],
                                              low=0.0, high=1.0, high_open=True)

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.params["epsilon"])
