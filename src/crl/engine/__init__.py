"""Engines: how a group of models of one architecture, dataset, recipe and defense is trained.

    sequential   one `fit` after another (checkpoints, bitwise resume within a model)
    ensemble     K models at once with stacked parameters (crl.engine.ensemble)
    ray          chunks of models as Ray tasks, on one machine or a cluster (crl.engine.ray_engine)
    auto         per model and device, from the measured table in docs/performance.md

Every engine trains a request from the same inputs (own seed, indices, shuffle order, defense
state), but not with the same arithmetic: the ensemble's batched products round differently from
one model's, and training grows those differences (for the relaxed objectives, whose branch
decisions compare a batch loss with alpha, into other models). What holds (docs/performance.md,
tests/test_engine.py): bitwise within one arithmetic; across arithmetics the same distribution
of models (the mean attack AUC agrees within its standard error), not the same model. So each
output's report names its arithmetic ("arithmetic": "sequential/cpu", "baddbmm/cpu",
"vmap/cuda", ...: `arithmetic_label`), each engine plans in advance which one each request of
a group gets (`Engine.plan`, over every request of the group, cached or not) and honours a
request's planned `arithmetic` when it trains it, and the audit's `ModelFactory` makes it part
of the cache key: a model is served only to a run that would have trained it the same way,
whichever of the group's other models the cache already held.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn

from crl.data.types import ImageData
from crl.models.spec import ModelSpec
from crl.recipe import Recipe
from crl.registry import Registry

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

    from crl.utils import resolve_device

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


def get_engine(name: str, **options: Any) -> Engine:
    """A registered engine by name."""
    import crl.engine.ensemble  # registers 'ensemble' and 'auto'
    import crl.engine.ray_engine  # registers 'ray' (imports ray only when used)
    import crl.engine.sequential  # noqa: F401  (registers the built-in engines)

    return ENGINES.get(name)(**options)
