"""The Defense protocol: everything a defense may change, without touching the training loop.

One formulation for K >= 1 models: every hook sees the models it serves as a leading model axis
(tensors) or a list (contexts). `fit` trains one model (K = 1); the ensemble engine trains K at
once (crl.engine.ensemble) for a defense with `batchable = True`. Both run the same epoch
(crl.engine.fit.train_epoch), which calls, in order:

    defense.check(recipe, n_train)             before anything trains (config-time checks)
    changes = defense.prepare(ctxs)            once, one context per model (its own seed); one
                                               `Changes` per model: what the defense replaces
                                               (train_idx: held-out data; model, optimizer,
                                               sampler: Opacus). The caller applies them
                                               (ctx.with_changes) and hands the new contexts
                                               to every later hook; no hook edits a context.
    for each epoch (1-based):
        for each step:
            step = Step(x, y, idx, logits, features, epoch, step)   leading model axis K
            losses = defense.loss(ctxs, step)  -> [K]; their sum is backpropagated, then the
                                               models and defense.optimizers() step
        ends = defense.end_epoch(ctxs, epoch)  -> one EpochEnd per model (metrics, stop?)
    changes = defense.finish(ctx)              per model, after training (K = 1 only): e.g.
                                               restore the best weights, unwrap Opacus's model

`step` tensors: x [K, B, ...], y and idx [K, B], logits [K, B, C], features [K, B, D]. Per-model
state (CRL's centers) is stacked on that axis and trained by the defense's `optimizers()`
(elementwise SGD: the same as K optimizers). A defense that can only serve one model at a time
(held-out data, its own sampler, early stopping, a per-model `finish`) sets batchable = False
and takes its one context with `only(ctxs)`.

The context carries the data, the typed recipe and batched evaluation (`ctx.predict`,
`ctx.evaluate`), named random streams (`ctx.stream("name")`, derived from the model's seed) and
`ctx.train_submodel` to train another model (DMP's teacher) without importing the loop.
Everything a hook needs arrives as an argument: no state is passed between hooks in hidden
fields. State that lives across steps (CRL's centers, AdvReg's inference model) belongs to the
defense and is checkpointed through `state_dict()` / `load_state_dict()`.

Membership ground truth: the prepared context's train_idx is exactly what the released model
trains on. Samples a defense holds out are not members; `evaluation_groups()` may name extra
groups of training-pool samples to attack separately (DMP's teacher-only half).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.core.params import ParamSpec
from crl.core.registry import DEFENSES
from crl.core.seeding import torch_generator
from crl.data.types import ImageData
from crl.models.evaluation import evaluate, predict_logits
from crl.training.recipe import Recipe
from crl.training.sampling import BatchSampler, ShuffledBatches


@dataclass
class Step:
    """Everything one training step of K >= 1 models knows (leading model axis K)."""

    x: torch.Tensor                 # normalised (and augmented) inputs [K, B, ...] on the device
    y: torch.Tensor                 # labels [K, B] on the device
    idx: torch.Tensor               # dataset indices of the batch [K, B]
    logits: torch.Tensor            # float32 logits [K, B, C] of the models on x (train mode)
    features: torch.Tensor | None   # penultimate features [K, B, D] (if defense.needs_features)
    epoch: int                      # 1-based
    step: int                       # 1-based within the epoch


@dataclass
class EpochEnd:
    """What a defense reports after an epoch: metrics for that epoch's row, and whether to stop."""

    metrics: dict[str, float] = field(default_factory=dict)
    stop: bool = False


SubTrainer = Callable[..., nn.Module]


@dataclass(frozen=True)
class Changes:
    """What `prepare` (or `finish`) replaces for one model; None: unchanged. The caller applies
    them with `ctx.with_changes` (after Opacus's make_private, which returns the model, the
    optimizer and the data loader it made)."""

    train_idx: torch.Tensor | None = None   # what the model trains on (held-out data removed)
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    sampler: BatchSampler | None = None


@dataclass(frozen=True)
class TrainContext:
    """What a defense sees of one model during training (read-only: hooks return `Changes`)."""

    data: ImageData
    recipe: Recipe
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_idx: torch.Tensor         # dataset indices the model trains on
    device: torch.device
    feat_dim: int | None            # width of the penultimate features (None if not needed)
    sampler: BatchSampler
    trainer: SubTrainer | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def with_changes(self, changes: Changes) -> TrainContext:
        """This context with the fields `changes` sets replaced."""
        return replace(self, **{k: v for k, v in vars(changes).items() if v is not None})

    def stream(self, *names: str | int) -> torch.Generator:
        """A CPU torch.Generator on this model's stream `names` (e.g. 'centers')."""
        return torch_generator(self.recipe.seed, *names)

    def predict(self, idx, model: nn.Module | None = None) -> torch.Tensor:
        """float32 logits of `model` (default: ctx.model) on data[idx], eval mode, on the device."""
        return predict_logits(self.model if model is None else model, self.data, idx).to(
            self.device)

    def evaluate(self, idx, model: nn.Module | None = None) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of `model` (default: ctx.model) on data[idx]."""
        return evaluate(self.model if model is None else model, self.data, idx)

    def train_submodel(self, model: nn.Module, idx, *, defense: Defense | None = None,
                       stream: str = "submodel") -> nn.Module:
        """Train `model` on data[idx] with this recipe (its seed derived by `stream`) and
        `defense` (default: plain cross-entropy); returns the trained module."""
        if self.trainer is None:
            raise CRLError("this context cannot train sub-models (no trainer); run through fit")
        return self.trainer(model, idx, defense=defense, stream=stream)


def only(name: str, ctxs: list[TrainContext]) -> TrainContext:
    """The one context of a defense that serves one model at a time (batchable = False)."""
    if len(ctxs) != 1:
        raise CRLError(f"defense '{name}' trains one model at a time, got {len(ctxs)}; expected "
                       "the sequential engine for it (batchable = False)")
    return ctxs[0]


class Defense:
    """Base class: plain cross-entropy and no-op hooks. Subclasses override what they need.

    `name` is set by the registry; `spec` declares the parameters (resolved into `params`).
    `batchable`: whether the ensemble engine may train this defense K > 1 models at a time.
    """

    name: ClassVar[str] = "ce"
    spec: ClassVar[ParamSpec] = ParamSpec()
    needs_features: ClassVar[bool] = False
    batchable: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        self.params: dict[str, Any] = self.spec.resolve(self.name, params)

    # --- hooks -----------------------------------------------------------------------------
    def check(self, recipe: Recipe, n_train: int) -> None:
        """Checks that depend on the recipe or the data; raise CRLError before any training."""

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """Called once before training, one context per model; what it changes per model."""
        return [Changes() for _ in ctxs]

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        """The loss of each model, [K]: mean cross-entropy."""
        return cross_entropy_per_model(step.logits, step.y)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Optimizers of the defense's own parameters; the loop zeroes and steps them."""
        return []

    def end_epoch(self, ctxs: list[TrainContext], epoch: int) -> list[EpochEnd]:
        """One EpochEnd per model (its metrics; whether to stop: batchable = False only)."""
        return [EpochEnd() for _ in ctxs]

    def finish(self, ctx: TrainContext) -> Changes:
        """Called once per model after training (fit only); what it changes."""
        return Changes()

    def report(self) -> dict[str, Any]:
        """Fields added to the results row (e.g. DP epsilon)."""
        return {}

    def held_out(self, train_idx: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """The dataset indices of `train_idx` that `prepare` will hold out from training for a
        model of seed `seed` (sorted; none by default): a pure function that `prepare` and the
        audit's plan both call, so the plan knows what every model trains on before any
        trains. A defense whose training set also depends on training (DMP's `ref_size`)
        returns what it holds out for certain."""
        return np.zeros(0, np.int64)

    def evaluation_groups(self) -> dict[str, np.ndarray]:
        """Extra groups of held-out training-pool samples to attack separately (name -> dataset
        indices), e.g. DMP's teacher-only half."""
        return {}

    # --- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@DEFENSES.register("ce")
class CrossEntropy(Defense):
    """No defense: ordinary cross-entropy."""

    description: ClassVar[str] = "no defense: plain cross-entropy training (the baseline)"


def cross_entropy_per_model(logits: torch.Tensor, y: torch.Tensor, **options: Any
                            ) -> torch.Tensor:
    """Mean cross-entropy of each of K models: logits [K, B, C], labels [K, B] -> [K];
    `options` go to F.cross_entropy (e.g. label_smoothing)."""
    models, batch = y.shape
    per_sample = F.cross_entropy(logits.reshape(models * batch, -1), y.reshape(-1),
                                 reduction="none", **options)
    return per_sample.view(models, batch).mean(1)


def build_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """Create a registered defense by name with hyper-parameters `params`."""
    return DEFENSES.get(name)(params)


def default_sampler(recipe: Recipe) -> BatchSampler:
    return ShuffledBatches(recipe.batch_size)
