"""The engine protocol: what every engine (crl.engine.*) takes and returns, and the
registry they register in. The package docstring (crl.engine) says what holds across
engines."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from crl.core.registry import Registry
from crl.data.types import ImageData
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe

ENGINES: Registry = Registry("engine")


@dataclass
class TrainRequest:
    """One model to train: its own seed (init, shuffle, augmentation and defense streams derive
    from it by name), its training indices, and optionally a monitoring set and a run folder
    for per-epoch checkpoints (honoured by engines that checkpoint)."""

    seed: int
    train_idx: np.ndarray
    eval_idx: np.ndarray | None = None
    run_dir: Path | None = None
    desc: str = ""
    arithmetic: str | None = None        # planned by Engine.plan (None: planned at train time)


@dataclass
class TrainOutput:
    net: nn.Module                       # raw network on the CPU, eval mode
    spec: ModelSpec                      # with any transforms the defense applied
    trained_on: np.ndarray               # sorted dataset indices it actually trained on
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    groups: dict[str, np.ndarray] = field(default_factory=dict)


OnDone = Callable[[int, TrainOutput], None]


def arithmetic_label(formulation: str, recipe: Recipe) -> str:
    """How a model's weights were computed: the formulation ('sequential', 'baddbmm', 'vmap')
    and the device class the recipe resolves to on this machine ('cpu', 'cuda', ...)."""
    import torch

    from crl.core.utils import resolve_device

    device = resolve_device() if recipe.device == "auto" else torch.device(recipe.device)
    return f"{formulation}/{device.type}"


class Engine(Protocol):
    name: str

    def train(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], requests: list[TrainRequest], *, resume: bool = False,
              progress: bool = True, on_done: OnDone | None = None) -> list[TrainOutput]:
        """Train every request (recipe.seed is replaced by each request's seed); call
        on_done(position, output) as each model finishes, so a caller can cache it at once."""
        ...

    def arithmetic(self, spec: ModelSpec, data: ImageData, recipe: Recipe,
                   defense: str) -> str:
        """The `arithmetic_label` this engine trains such models with (the cache key's part;
        each output's report["arithmetic"] says what actually trained it)."""
        ...

    def plan(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
             requests: list[TrainRequest], *, resume: bool = False) -> list[str]:
        """Per request, the `arithmetic_label` it trains with as one of `requests` (a whole
        group, cached or not); `train` honours it when set on the request."""
        ...
