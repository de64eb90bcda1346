"""The Defense interface: everything a defense may change, without touching `fit`'s loop.

`fit` calls, in order:
    defense.prepare(ctx)                    once, before training (may change ctx.train_idx,
                                            ctx.model, ctx.optimizer, add data to ctx.extra)
    for each epoch (1-based):
        for each mini-batch:
            defense.before_step(ctx, x, y, epoch)        e.g. AdvReg's inner attack steps
            logits = model(x); features = tap (if defense.needs_features)
            loss = defense.loss(logits, features, y, epoch)
            backward; model optimizer step; each of defense.optimizers() steps
            defense.after_step(ctx, epoch)
        stop = defense.end_epoch(ctx, epoch)            True -> stop training (early stopping)
    defense.finish(ctx)                    after training (e.g. restore best weights)

Extra learnable parameters (CRL's centers) live on the defense, with their own optimizers
returned by `optimizers()`; `fit` zeroes and steps them, and checkpoints them through
`state_dict()` / `load_state_dict()`. `report()` adds fields to the results row (e.g. DP epsilon).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crl.registry import DEFENSES


@dataclass
class FitContext:
    """What a defense can see and change during `fit`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor            # uint8 images of the whole dataset handed to fit [N, C, H, W]
    y: torch.Tensor            # labels [N]
    train_idx: torch.Tensor    # indices into x/y the model trains on (a defense may change it)
    num_classes: int
    feat_dim: int | None
    device: torch.device
    epochs: int
    batch_size: int
    seed: int
    mean: tuple
    std: tuple
    generator: torch.Generator | None = None   # fit's RNG for shuffling/augmentation
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: Any = None         # the crl.train.Recipe fit runs (None outside fit), e.g. for a teacher

    def batch_inputs(self, idx: torch.Tensor) -> torch.Tensor:
        """Normalised float inputs for dataset indices `idx` on ctx.device (no augmentation)."""
        from crl.data.types import normalize

        return normalize(self.x[idx].to(self.device), self.mean, self.std)


class Defense:
    """Base class: plain cross-entropy and no-op hooks. Subclasses override what they need."""

    name: str = "ce"
    needs_features: bool = False
    # Parameter names and defaults; `params` holds the resolved values.
    defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        from crl.errors import CRLError

        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise CRLError(
                f"unknown parameter '{self.name}.{unknown[0]}'; {self.name} takes: {valid}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}

    # --- hooks -----------------------------------------------------------------------------
    def prepare(self, ctx: FitContext) -> None:
        """Called once before training."""

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        return F.cross_entropy(logits, targets)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return []

    def before_step(self, ctx: FitContext, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        """Called before each model step (x already normalised and augmented)."""

    def after_step(self, ctx: FitContext, epoch: int) -> None:
        """Called after each model step."""

    def end_epoch(self, ctx: FitContext, epoch: int) -> bool:
        """Called after each epoch; return True to stop training."""
        return False

    def finish(self, ctx: FitContext) -> None:
        """Called once after training."""

    def extra_metrics(self) -> dict[str, float]:
        """Per-epoch values to log beside loss/accuracy (e.g. CRL's two terms); reset by fit."""
        return {}

    def report(self) -> dict[str, Any]:
        """Fields added to the results row."""
        return {}

    # --- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@DEFENSES.register("ce")
class CrossEntropy(Defense):
    """No defense: ordinary cross-entropy."""

    name = "ce"


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """Create a registered defense by name with hyper-parameters `params`."""
    cls = DEFENSES.get(name)
    return cls(**(params or {}))
