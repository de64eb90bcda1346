"""Confidence penalty (Pereyra et al. 2017): cross-entropy minus beta times posterior entropy."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import LogsMeans
from crl.defenses.base import Defense, Step, TrainContext


def _ce_and_entropy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and mean posterior entropy over the batch, per model: logits
    [..., B, C], labels [..., B] -> two [...] tensors."""
    log_p = F.log_softmax(logits, dim=-1)
    ce = -log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1)
    return ce, -(log_p.exp() * log_p).sum(-1).mean(-1)


@DEFENSES.register("confidence_penalty")
class ConfidencePenalty(LogsMeans, Defense):
    """L = CE(logits, y) - beta * mean_i H(softmax(logits_i)); penalises confident posteriors.

    end_epoch() metrics: the epoch's mean cross-entropy `l_ce` and mean entropy `entropy`.
    """

    description: ClassVar[str] = ("confidence penalty: cross-entropy minus beta times the "
                                  "posterior entropy (Pereyra et al., ICLR workshop 2017)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("beta", 0.1, float, low=0.0, search=(0.01, 2.0, "log"),
              help="weight of the entropy bonus"),
    )

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        """CE - beta * mean entropy per model: logits [K, B, C] -> [K]."""
        means = self._means()
        ce, ent = _ce_and_entropy(step.logits, step.y)
        means.add(l_ce=ce, entropy=ent)
        return ce - self.params["beta"] * ent
