"""Querying a model as an attacker does: arbitrary input batches in, logits or labels out.

A QueryOracle wraps one torch model. Inputs are images in the model's input space before
normalisation: float tensors [B, C, H, W] with values in [0, 1] (crl's models expect
normalised inputs; the oracle normalises with the dataset's mean and std). Every input image
counts as one query against an optional budget; a query past the budget raises a one-line
CRLError before the model runs. In label-only mode only the predicted labels come back:
reading logits or input gradients raises.

QueryAccess is what an attack gets from the audit (AttackContext.queries): the target pool's
images and one oracle per pool model (model 0 is the target), label-only unless asked.

SampleQueries is how the audit itself asks a model about the samples of its data set (by
index): logits (optionally on mirrored inputs), accuracy and per-sample input-gradient norms,
batched, in eval mode, on the model's device. `inputs(idx, device)` turns sample indices into
what the model takes (crl's images, normalised; the caller's own tensors for
crl.audit_training), so one code path serves every model source (crl.audit.source).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.models.evaluation import device_of, eval_mode, index_batches
from crl.models.gradients import batch_gradient_norms

DEFAULT_BATCH = 512
GRADIENT_BATCH = 256


def describe(t: object) -> str:
    """'torch.float32 tensor of shape [2, 3]', or the type's name."""
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


class SampleQueries:
    """One model asked about samples of the audit's data by index (see the module docstring).

    inputs(idx, device): sample indices (int64 tensor) -> the model's inputs on `device`;
    labels: int64 [N] of every sample; batch_size: samples per forward pass (gradients: at
    most GRADIENT_BATCH)."""

    def __init__(self, model: nn.Module,
                 inputs: Callable[[torch.Tensor, torch.device], torch.Tensor],
                 labels: torch.Tensor, num_classes: int, *,
                 batch_size: int = DEFAULT_BATCH) -> None:
        self.model, self.inputs, self.labels = model, inputs, labels
        self.num_classes, self.batch_size = num_classes, batch_size

    def _batches(self, idx, batch_size: int):
        return index_batches(self.model, idx, batch_size, self.inputs)

    @torch.no_grad()
    def logit_tensor(self, idx, flip: bool = False) -> torch.Tensor:
        """float32 logits [len(idx), num_classes] on the CPU (inputs mirrored with `flip`)."""
        out = [self.model(xb.flip(-1) if flip else xb) for _, xb in
               self._batches(idx, self.batch_size)]
        if not all(isinstance(o, torch.Tensor) for o in out):
            kind = next(type(o).__name__ for o in out if not isinstance(o, torch.Tensor))
            raise CRLError(f"model(x) of {type(self.model).__name__} returned a {kind}: "
                           f"expected a tensor of logits [samples, {self.num_classes}] (wrap "
                           "the model to return only its logits)")
        z = torch.cat([o.float().cpu() for o in out]) if out else torch.empty(
            0, self.num_classes)
        if z.shape != (len(idx), self.num_classes) or not torch.isfinite(z).all():
            raise CRLError(f"model(x) of {type(self.model).__name__} = {describe(z)}"
                           f"{'' if torch.isfinite(z).all() else ' with NaN or inf'}: expected "
                           f"finite logits [samples, {self.num_classes}] (num_classes)")
        return z

    def logits(self, idx, flip: bool = False) -> np.ndarray:
        return self.logit_tensor(idx, flip).numpy()

    def accuracy(self, idx) -> float:
        """The fraction of samples `idx` whose predicted class is their label."""
        z = self.logit_tensor(idx).double()
        y = self.labels[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
        return float((z.argmax(1) == y.cpu()).float().mean())

    def gradient_norms(self, idx) -> np.ndarray:
        """Per-sample L2 norm of d CE(model(x), y) / dx on the model's inputs (Grad-x)."""
        out = [batch_gradient_norms(self.model, xb, self.labels[b])
               for b, xb in self._batches(idx, min(self.batch_size, GRADIENT_BATCH))]
        return torch.cat(out).numpy() if out else np.zeros(0)


class QueryOracle:
    """Query access to one model (see the module docstring).

    model: the network (expects normalised inputs); mean/std: per-channel normalisation on the
    [0, 1] scale; label_only: only predicted labels; budget: the most input images it answers
    (None: unlimited); batch_size: images per forward pass.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], *,
                 label_only: bool = False, budget: int | None = None,
                 batch_size: int = DEFAULT_BATCH) -> None:
        if budget is not None and budget < 0:
            raise CRLError(f"query budget = {budget}: expected a non-negative number or None")
        if batch_size < 1:
            raise CRLError(f"batch_size = {batch_size}: expected a positive integer")
        self.model, self.label_only = model, label_only
        self.budget, self.batch_size = budget, batch_size
        self.device = device_of(model)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.queries = 0

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1] or not x.is_floating_point():
            raise CRLError(f"query inputs = shape {list(x.shape)}, {x.dtype}: expected float "
                           f"images [B, {self.mean.shape[1]}, H, W]")
        if x.numel() and (not torch.isfinite(x).all() or x.min() < -1e-6 or x.max() > 1 + 1e-6):
            raise CRLError("query inputs: expected finite values in [0, 1] (images before "
                           "normalisation)")
        return x

    def _charge(self, n: int) -> None:
        if self.budget is not None and self.queries + n > self.budget:
            raise CRLError(f"query budget = {self.budget}: exceeded ({self.queries} used, "
                           f"{n} more asked)")
        self.queries += n

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float32)
        return (x - self.mean.to(self.device)) / self.std.to(self.device)

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        x = self._check(x)
        self._charge(x.shape[0])
        with eval_mode(self.model):
            out = [reduce(self.model(self._normalised(x[i:i + self.batch_size]))).cpu()
                   for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, C] on the CPU; refused in label-only mode."""
        if self.label_only:
            raise CRLError("query oracle is label-only: logits are not available")
        return self._forward(x, lambda z: z.float())

    def labels(self, x: torch.Tensor) -> np.ndarray:
        """Predicted labels (int64 [B])."""
        return self._forward(x, lambda z: z.argmax(1)).numpy().astype(np.int64)

    def input_gradients(self, x: torch.Tensor, y) -> torch.Tensor:
        """d CE(model(x), y) / dx in the [0, 1] input space (float32 [B, C, H, W], CPU), one
        query per image; refused in label-only mode (white-box attacks only)."""
        if self.label_only:
            raise CRLError("query oracle is label-only: input gradients are not available")
        x = self._check(x)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long)
        self._charge(x.shape[0])
        out = []
        with eval_mode(self.model):
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size].to(self.device, torch.float32).requires_grad_(True)
                loss = F.cross_entropy(self.model(self._normalised(xb)),
                                       y[i:i + self.batch_size].to(self.device),
                                       reduction="sum")
                (g,) = torch.autograd.grad(loss, xb)
                out.append(g.cpu())
        return torch.cat(out) if out else torch.empty_like(x)


@dataclass
class QueryAccess:
    """The target pool's images and query access to the pool models (AttackContext.queries).

    images: uint8 [N, C, H, W] of the target pool, in the order of ctx.target's samples.
    models: the pool models in the order of ctx.target (model 0 is the target).
    """

    images: torch.Tensor
    models: Sequence[nn.Module]
    mean: Sequence[float]
    std: Sequence[float]
    progress: bool = True   # attacks show a progress bar (the audit's --quiet turns it off)
    shadow_images: torch.Tensor | None = None   # uint8, the shadow pool (ctx.shadow's order)
    shadow_models: Sequence[nn.Module] = ()      # the shadow models (ctx.shadow's order)

    def inputs(self, positions=None) -> torch.Tensor:
        """float [n, C, H, W] in [0, 1] of the pool samples at `positions` (default all)."""
        x = self.images if positions is None else self.images[torch.as_tensor(
            np.asarray(positions), dtype=torch.long)]
        return x.float() / 255.0

    def oracle(self, model: int = 0, *, label_only: bool = True, budget: int | None = None,
               shadow: bool = False) -> QueryOracle:
        """A fresh oracle (query count 0) for pool model `model` (or shadow model `model`):
        label-only unless asked."""
        models = self.shadow_models if shadow else self.models
        if not 0 <= model < len(models):
            raise CRLError(f"{'shadow ' if shadow else ''}model = {model}: expected 0 to "
                           f"{len(models) - 1}")
        return QueryOracle(models[model], self.mean, self.std, label_only=label_only,
                           budget=budget)

    def shadow_inputs(self, positions) -> torch.Tensor:
        """float [n, C, H, W] in [0, 1] of the shadow-pool samples at `positions`."""
        if self.shadow_images is None:
            raise CRLError("query access has no shadow models (run with --shadows >= 1)")
        return self.shadow_images[torch.as_tensor(np.asarray(positions),
                                                  dtype=torch.long)].float() / 255.0
