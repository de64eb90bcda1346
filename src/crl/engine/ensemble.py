"""The ensemble engine: K models of one architecture trained at once with stacked parameters,
each from the same inputs as the sequential engine's model for its request; and the `auto`
engine. The same inputs, not the same arithmetic: batched products round differently from one
model's, so an ensemble model equals the sequential one only to rounding grown by training
(crl.engine: the arithmetic is recorded per model and is part of the cache key).

Per model, exactly as `fit` does it: initialisation from the stream (seed, "init") before
`spec.build()`, batches from its own shuffle stream (the same `ShuffledBatches`), augmentation
from its own "augment" stream, the defense's per-model state (CRL's centers stacked [K, C, D],
drawn from each model's "centers" stream). SGD with momentum and weight decay, and the centers'
own SGD, run on the stacked tensors: every update is elementwise, so one optimizer over [K, ...]
is K optimizers. Not the fused SGD: on the CPU its vectorised kernel rounds an element by where
it falls in the stacked tensor, so a model's weights changed with the chunk it trained in; with
the plain (per-tensor or foreach) update an mlp's weights are bitwise the same in any chunk.
One LambdaLR multistep schedule serves all (the recipe is shared). Two formulations
(crl.engine.stacked): `baddbmm` (explicit batched layers, the `mlp`) and `vmap` (torch.func,
any other model). Measured in docs/performance.md.

What falls back to the sequential engine, never an error: a defense that is not batchable
(dpsgd, advreg, dmp, early_stopping), a model no formulation reproduces (active dropout), a
model whose stack fails a trial training step on two samples (an operation vmap does not
support; a warning names it), a request with a checkpoint to resume, and a request alone in its
train size within its group (batches must align), which keeps its per-epoch checkpoints. That is
decided over the whole group by `plan` (the audit's factory plans every model of a defense,
cached or not, and sets each request's `arithmetic`); `train` honours a planned arithmetic, so
a request planned into a stack whose mates the cache already held trains as a stack of one, and
which arithmetic trains a model never depends on the cache's contents. The stack computes in the
default memory format even when the recipe asks for channels_last: vmap cannot answer a query
for another format, which CUDA's batch norm makes (the models differ from channels_last ones
only in rounding).
Models train in chunks of `ensemble_size` (default: as many as fit a memory budget, at most 64).
No per-epoch checkpoints: `on_done` is called per model as its chunk finishes, so a rerun skips
finished models through the cache. Each output's report names what trained it:
"engine": "ensemble/baddbmm", "ensemble/vmap" or "sequential", "arithmetic" (crl.engine's
`arithmetic_label`) and, for a stack, "models_in_chunk". Chunking does not change an mlp's
weights (baddbmm or vmap); a vmap model with convolutions computes them as one grouped
convolution over the chunk, whose kernels round by the chunk's size (docs/performance.md).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.core.utils import resolve_device
from crl.data.types import ImageData, normalize
from crl.defenses.base import Changes, Defense, TrainContext, build_defense
from crl.engine.fit import ModelGroup, lr_schedule, train_context, train_epoch
from crl.engine.protocol import ENGINES, OnDone, TrainOutput, TrainRequest, arithmetic_label
from crl.engine.sequential import initial_model, train_one
from crl.engine.stacked import FORMULATIONS, Stack, agrees, build_stack, formulation_for, trial_step
from crl.models.spec import ModelSpec
from crl.training.recipe import Recipe

MAX_ENSEMBLE = 64               # models per chunk at most (more gains nothing measurable)
CPU_BUDGET = 2 * 2**30          # bytes a chunk may hold on the CPU
GPU_SHARE = 0.5                 # share of the device's free memory a chunk may hold on CUDA

OPTIONS = ParamSpec(
    Param("ensemble_size", None, kind=int, low=1, nullable=True,
          help="models per chunk; null: as many as fit the memory budget (at most 64)"),
    Param("formulation", "best", kind=str, choices=("best", *FORMULATIONS, "sequential"),
          help="best: baddbmm where the model fits it, else vmap; sequential: none"),
)


def batchable(defense: str) -> bool:
    """Whether the registered `defense` can train K models at once."""
    return bool(DEFENSES.get(defense).batchable)


@ENGINES.register("ensemble")
class EnsembleEngine:
    """K models at once per chunk; what cannot be batched trains sequentially."""

    def __init__(self, **options: Any) -> None:
        self.options = OPTIONS.resolve("ensemble", options)
        self._trains: dict[tuple, str | None] = {}

    def formulation(self, spec: ModelSpec, defense: str) -> str | None:
        """The formulation for this model and defense, or None (sequential)."""
        if not batchable(defense):
            return None
        with torch.device("meta"):
            probe = spec.build()
        return formulation_for(probe, self.options["formulation"])

    def arithmetic(self, spec: ModelSpec, data: ImageData, recipe: Recipe,
                   defense: str) -> str:
        """The formulation that will train such models ('sequential' where none can, a stack
        that fails its trial step included), with the recipe's device class. The trial step
        runs where the device is present (not for a Ray driver without the workers' GPU)."""
        formulation = self.formulation(spec, defense)
        if formulation is not None and _present(recipe.device):
            device = resolve_device(recipe.device)
            key = (repr(spec.to_dict()), formulation, str(device), recipe.bf16)
            if key not in self._trains:
                self._trains[key] = _stack_failure(spec, data, recipe, formulation)
                if self._trains[key] is not None:
                    warnings.warn(f"the {formulation} stack of {spec.arch} cannot train: "
                                  f"{self._trains[key]}; training these models sequentially",
                                  RuntimeWarning, stacklevel=2)
            formulation = None if self._trains[key] is not None else formulation
        return arithmetic_label(formulation or "sequential", recipe)

    def plan(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
             requests: list[TrainRequest], *, resume: bool = False) -> list[str]:
        """Sequential for a request with a checkpoint to resume and for one alone in its train
        size among `requests`; the stack's arithmetic for the rest."""
        label = self.arithmetic(spec, data, recipe, defense)
        sequential = arithmetic_label("sequential", recipe)
        if label == sequential:
            return [sequential] * len(requests)
        alone, groups = _groups(requests, resume)
        alone += [g[0] for g in groups if len(g) == 1]
        return [sequential if i in alone else label for i in range(len(requests))]

    def train(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], requests: list[TrainRequest], *, resume: bool = False,
              progress: bool = True, on_done: OnDone | None = None) -> list[TrainOutput]:
        outputs: list[TrainOutput | None] = [None] * len(requests)

        def done(position: int, out: TrainOutput) -> None:
            outputs[position] = out
            if on_done is not None:
                on_done(position, out)

        run = _Run(spec, data, recipe, defense, params, progress)
        formulation = self.formulation(spec, defense)
        planned = [r.arithmetic for r in requests]
        if None in planned:
            planned = self.plan(spec, data, recipe, defense, requests, resume=resume)
        stacked = [formulation is not None and not p.startswith("sequential/") for p in planned]
        run.sequential(requests, [i for i, s in enumerate(stacked) if not s], done, resume)
        groups = _by_size(requests, [i for i, s in enumerate(stacked) if s])
        if groups:
            size = self.options["ensemble_size"] or default_ensemble_size(spec, recipe)
        for positions in groups:
            for chunk in _chunks(positions, size):
                run.ensemble(requests, chunk, formulation, done)
        return outputs  # type: ignore[return-value]


@dataclass
class _Run:
    """One call of EnsembleEngine.train: what every chunk shares."""

    spec: ModelSpec
    data: ImageData
    recipe: Recipe
    defense: str
    params: dict[str, Any]
    progress: bool

    def sequential(self, requests: list[TrainRequest], positions: list[int], done: OnDone,
                   resume: bool) -> None:
        for i in positions:
            done(i, train_one(self.spec, self.data, self.recipe, self.defense, self.params,
                              requests[i], resume=resume, progress=self.progress))

    def ensemble(self, requests: list[TrainRequest], positions: list[int], formulation: str,
                 done: OnDone) -> None:
        chunk = [requests[i] for i in positions]
        try:
            ens = _Ensemble.start(self, chunk, formulation)
        except _Mismatch as e:
            warnings.warn(f"{e}; training these models sequentially", RuntimeWarning,
                          stacklevel=2)
            return self.sequential(requests, positions, done, resume=False)
        for i, out in zip(positions, ens.train(self.progress)):
            done(i, out)


class _Mismatch(Exception):
    """The stacked model does not compute what the models compute (a foreign architecture)."""


def _groups(requests: list[TrainRequest], resume: bool) -> tuple[list[int], list[list[int]]]:
    """(positions with a checkpoint to resume, the others grouped by train size)."""
    alone = [i for i, req in enumerate(requests) if resume and req.run_dir is not None
             and (Path(req.run_dir) / "checkpoint.pt").exists()]
    return alone, _by_size(requests, [i for i in range(len(requests)) if i not in alone])


def _by_size(requests: list[TrainRequest], positions: list[int]) -> list[list[int]]:
    """`positions` grouped by their requests' train size (a size alone: a group of one)."""
    by_size: dict[int, list[int]] = {}
    for i in positions:
        by_size.setdefault(len(requests[i].train_idx), []).append(i)
    return list(by_size.values())


def _chunks(positions: list[int], size: int) -> list[list[int]]:
    """`positions` in the fewest chunks of at most `size`, of (nearly) equal length."""
    count = math.ceil(len(positions) / size)
    return [[int(i) for i in part] for part in np.array_split(positions, count)]


def _present(device: str) -> bool:
    """Whether `device` exists on this machine."""
    try:
        resolve_device(device)
    except CRLError:
        return False
    return True


def _stack_failure(spec: ModelSpec, data: ImageData, recipe: Recipe,
                   formulation: str) -> str | None:
    """Why a stack of two such models cannot train like `fit` (None: it can): the trial step
    and the logits check `_Ensemble.start` makes, on two fresh models and two samples."""
    device = resolve_device(recipe.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        models = [initial_model(spec, seed).to(device) for seed in (0, 1)]
    probe = normalize(data.x[:2].to(device), data.mean, data.std)
    failure = trial_step(models, formulation, probe, recipe.bf16)
    if failure is None and not agrees(build_stack(models, formulation), models, probe):
        failure = "the stack does not reproduce the model's own logits"
    return failure


def default_ensemble_size(spec: ModelSpec, recipe: Recipe) -> int:
    """Models per chunk: the memory budget over one model's training footprint (weights,
    gradients, momentum and a copy: 4x the parameters; activations kept for the backward
    pass: about 3x the forward's per sample, times the batch), at most MAX_ENSEMBLE."""
    with torch.device("meta"):
        model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    per_model = 4 * (4 * params + 3 * recipe.batch_size * _activations(model, spec))
    device = resolve_device(recipe.device)
    budget = (GPU_SHARE * torch.cuda.mem_get_info(device)[0] if device.type == "cuda"
              else CPU_BUDGET)
    return int(max(1, min(MAX_ENSEMBLE, budget // per_model)))


def _activations(model: nn.Module, spec: ModelSpec) -> int:
    """Elements every leaf layer outputs for one sample (a forward pass on the meta device)."""
    total = 0

    def count(_module, _inputs, output) -> None:
        nonlocal total
        total += output.numel() if isinstance(output, torch.Tensor) else 0

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()                 # one sample: BatchNorm refuses it in training mode
            model(torch.empty(1, spec.in_channels, spec.image_size, spec.image_size,
                              device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


class _Ensemble(ModelGroup):
    """K models training at once (crl.engine.fit's ModelGroup): their contexts (own seed, indices,
    sampler), the stacked formulation, the shared optimizer, the defense and each model's
    streams."""

    def __init__(self, run: _Run, requests: list[TrainRequest], contexts: list[TrainContext],
                 stack: Stack, defense: Defense, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(contexts, defense, optimizer,
                         [req.desc or str(k) for k, req in enumerate(requests)])
        self.run, self.requests, self.stack = run, requests, stack

    @classmethod
    def start(cls, run: _Run, requests: list[TrainRequest], formulation: str) -> _Ensemble:
        """Every model initialised as `train_one` initialises it, stacked; the defense
        prepared for the K models (CRLError on what `fit` would refuse)."""
        recipe, device = run.recipe, resolve_device(run.recipe.device)
        models = [initial_model(run.spec, req.seed).to(device) for req in requests]
        probe = normalize(run.data.x[torch.as_tensor(requests[0].train_idx[:2])].to(device),
                          run.data.mean, run.data.std)
        failure = trial_step(models, formulation, probe, recipe.bf16)
        if failure is not None:
            raise _Mismatch(f"the {formulation} stack of {run.spec.arch} cannot train: "
                            f"{failure}")
        stack = build_stack(models, formulation)
        if not agrees(stack, models, probe):
            raise _Mismatch(f"the {formulation} stack of {run.spec.arch} does not reproduce "
                            "the model's own logits")
        # not fused: the fused CPU kernel rounds by position in the stack (module docstring)
        optimizer = torch.optim.SGD(stack.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        defense = build_defense(run.defense, run.params)
        defense.check(recipe, len(requests[0].train_idx))
        contexts = [_context(run, req, model, optimizer, defense)
                    for req, model in zip(requests, models)]
        if any(vars(changes) != vars(Changes()) for changes in defense.prepare(contexts)):
            raise CRLError(f"defense '{defense.name}' changed a model's training set, model, "
                           "optimizer or sampler while training K models at once; expected "
                           "batchable = False for such a defense")
        return cls(run, requests, contexts, stack, defense, optimizer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.stack(x)

    def module(self, k: int) -> nn.Module:
        return self.stack.module(k)

    def train_mode(self) -> None:
        self.stack.train(True)

    def train(self, progress: bool) -> list[TrainOutput]:
        """Every epoch of the recipe; the trained models, their histories and reports."""
        scheduler = lr_schedule(self.optimizer, self.recipe)
        histories: list[list[dict[str, float]]] = [[] for _ in self.requests]
        desc = f"{len(self.requests)} models ({self.stack.formulation})"
        eval_idx = [req.eval_idx for req in self.requests]
        for epoch in tqdm(range(1, self.recipe.epochs + 1), desc=desc, disable=not progress,
                          leave=False, dynamic_ncols=True):
            rows, _ = train_epoch(self, epoch, eval_idx)
            for history, row in zip(histories, rows):
                history.append(row)
            scheduler.step()
        return [self.output(k, history) for k, history in enumerate(histories)]

    def output(self, k: int, history: list[dict[str, float]]) -> TrainOutput:
        """Model k as the sequential engine returns it (CPU, eval mode), its report naming
        this engine and formulation."""
        report = {"engine": f"ensemble/{self.stack.formulation}",
                  "arithmetic": arithmetic_label(self.stack.formulation, self.run.recipe),
                  "models_in_chunk": len(self.requests)}
        if self.run.recipe.channels_last:
            report["channels_last"] = "not applied (the ensemble computes in the default layout)"
        return TrainOutput(self.stack.module(k).cpu().eval(), self.run.spec,
                           np.sort(self.contexts[k].train_idx.numpy()), report, history)


def _context(run: _Run, request: TrainRequest, model: nn.Module,
             optimizer: torch.optim.Optimizer, defense: Defense) -> TrainContext:
    """Model k's context: its own seed (streams), sorted training indices."""
    return train_context(run.data, replace(run.recipe, seed=request.seed), model, optimizer,
                         np.sort(np.asarray(request.train_idx)), defense)


# What `auto` runs per (model, device type), from the timings in docs/performance.md
# ("Training many models at once", benchmarks/engine.py); anything not listed trains
# sequentially, so `auto` is never slower than sequential by this table. The CUDA rows are the
# issue's expectation and are not measured yet (no GPU was lent to this work):
# benchmarks/gpu_engine.sh measures them.
AUTO_TABLE: dict[tuple[str, str], str] = {
    ("mlp", "cpu"): "baddbmm",          # 32 MLPs: faster than vmap and sequential
    ("cnn", "cpu"): "sequential",       # 8 cnn models: vmap slower than sequential
    ("mlp", "cuda"): "baddbmm",         # not measured
    ("cnn", "cuda"): "vmap",            # not measured
    ("resnet18", "cuda"): "vmap",       # not measured
    ("densenet121", "cuda"): "vmap",    # not measured
}


@ENGINES.register("auto")
class AutoEngine:
    """Per model and device, the engine AUTO_TABLE names (the ensemble's formulation or
    sequential); the ensemble still falls back to sequential where it cannot batch."""

    def __init__(self, **options: Any) -> None:
        self.options = OPTIONS.without(["formulation"]).resolve("auto", options)
        self._inner: dict[str, EnsembleEngine] = {}

    def arithmetic(self, spec: ModelSpec, data: ImageData, recipe: Recipe,
                   defense: str) -> str:
        return self.inner(self.choose(spec, recipe)).arithmetic(spec, data, recipe, defense)

    def plan(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
             requests: list[TrainRequest], *, resume: bool = False) -> list[str]:
        return self.inner(self.choose(spec, recipe)).plan(spec, data, recipe, defense,
                                                          requests, resume=resume)

    def inner(self, formulation: str) -> EnsembleEngine:
        """The ensemble engine of `formulation` (kept: it remembers its trial steps)."""
        if formulation not in self._inner:
            self._inner[formulation] = EnsembleEngine(**self.options, formulation=formulation)
        return self._inner[formulation]

    def choose(self, spec: ModelSpec, recipe: Recipe) -> str:
        """'baddbmm', 'vmap' or 'sequential' for this model on the recipe's device."""
        return AUTO_TABLE.get((spec.arch, resolve_device(recipe.device).type), "sequential")

    def train(self, spec: ModelSpec, data: ImageData, recipe: Recipe, defense: str,
              params: dict[str, Any], requests: list[TrainRequest], *, resume: bool = False,
              progress: bool = True, on_done: OnDone | None = None) -> list[TrainOutput]:
        engine = self.inner(self.choose(spec, recipe))
        return engine.train(spec, data, recipe, defense, params, requests, resume=resume,
                            progress=progress, on_done=on_done)
