"""Label smoothing (Szegedy et al. 2016; studied by Müller et al. 2019): soft one-hot targets."""
from __future__ import annotations

from typing import ClassVar

import torch

from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses.base import Defense, Step, TrainContext, cross_entropy_per_model


@DEFENSES.register("label_smoothing")
class LabelSmoothing(Defense):
    """Cross-entropy against (1 - epsilon) * one_hot(y) + epsilon / C (uniform mass on all C)."""

    description: ClassVar[str] = ("label smoothing: cross-entropy against smoothed one-hot "
                                  "targets (Szegedy et al., CVPR 2016)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("epsilon", 0.1, float, low=0.0, high=1.0, high_open=True,
              search=(0.02, 0.5, "log"), help="mass spread uniformly over all classes"),
    )

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        return cross_entropy_per_model(step.logits, step.y,
                                       label_smoothing=self.params["epsilon"])
