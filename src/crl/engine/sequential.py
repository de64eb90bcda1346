"""The sequential engine: one `fit` per model (per-epoch checkpoints, bitwise resume)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crl.core.seeding import seed_for
from crl.core.utils import jsonable
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.engine.fit import fit
from crl.engine.protocol import ENGINES, OnDone, TrainOutput, TrainRequest, arithmetic_label
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe


def initial_model(spec: ModelSpec, seed: int) -> nn.Module:
    """A model's initial weights: built right after seeding torch from the stream (seed, 'init')
    (every engine starts a request's model from this)."""
    torch.manual_seed(seed_for(seed, "init"))
    return spec.build()


def train_one(spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], request: TrainRequest, *, resume: bool = False,
              progress: bool = True) -> TrainOutput:
    """One model: initialised from the stream (seed, 'init'), trained by `fit`."""
    net = initial_model(spec, request.seed)
    result = fit(net, data, np.sort(request.train_idx), replace(recipe, seed=request.seed),
                 build_defense(defense, params), eval_idx=request.eval_idx,
                 run_dir=request.run_dir, resume=resume, progress=progress,
                 desc=request.desc or "train")
    for name in result.report.get("model_transforms", []):
        spec = spec.with_transform(name)
    return TrainOutput(result.model.cpu().eval(), spec, np.sort(result.train_idx),
                       {**jsonable(result.report), "engine": "sequential",
                        "arithmetic": arithmetic_label("sequential", recipe)}, result.history,
                       {k: np.sort(np.asarray(v)) for k, v in result.groups.items()})


@ENGINES.register("sequential")
class SequentialEngine:
    """Models one after another in this process."""

    def arithmetic(self, spec: ModelSpec, data: ImageData, recipe: Recipe,
                   defense: str) -> str:
        return arithmetic_label("sequential", recipe)

    def plan(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
             requests: list[TrainRequest], *, resume: bool = False) -> list[str]:
        return [self.arithmetic(spec, data, recipe, defense)] * len(requests)

    def train(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], requests: list[TrainRequest], *, resume: bool = False,
              progress: bool = True, on_done: OnDone | None = None) -> list[TrainOutput]:
        outputs = []
        for i, req in enumerate(tqdm(requests, desc="models", leave=False,
                                     disable=not progress or len(requests) < 2)):
            out = train_one(spec, data, recipe, defense, params, req, resume=resume,
                            progress=progress)
            if on_done is not None:
                on_done(i, out)
            outputs.append(out)
        return outputs
