"""Helpers shared by the defenses: held-out splits of the members, per-epoch means, entropy."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.data.splits import stratified_take
from crl.defenses.base import Changes, EpochEnd, TrainContext
from crl.losses import BRANCHES


def held_out_count(owner: str, param: str, fraction: float, n: int) -> int:
    """How many of `n` training samples `fraction` holds out (rounded); a CRLError unless at
    least one is held out and one is left to train on. Used by check() and by the split."""
    k = round(fraction * n)
    if not 1 <= k <= n - 1:
        raise CRLError(f"{owner}.{param} = {fraction!r}: holds out {k} of {n} training samples; "
                       "expected a fraction that holds out at least 1 and keeps at least 1")
    return k


def held_out_split(owner: str, param: str, fraction: float, train_idx, labels,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the members `train_idx` into (kept, held_out), both sorted: a pure
    function of the indices, the dataset's labels and the model's seed (the named stream
    (owner, "split")), so the audit's plan knows before training what each model keeps.
    `fraction` of the members is held out (rounded)."""
    idx = np.sort(np.asarray(train_idx, dtype=np.int64))
    k = held_out_count(owner, param, fraction, idx.size)
    labels = np.asarray(labels, dtype=np.int64)
    held, kept = stratified_take(idx, labels, k, numpy_rng(seed, owner, "split"))
    return kept, held


def split_members(ctx: TrainContext, owner: str, param: str, fraction: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`held_out_split` of ctx.train_idx with this model's seed, as tensors (kept, held_out).

    Only members are ever drawn from, so the non-members stay untouched for the audit.
    """
    kept, held = held_out_split(owner, param, fraction, ctx.train_idx.cpu().numpy(),
                                ctx.data.y.cpu().numpy(), ctx.seed)
    return torch.as_tensor(kept, dtype=torch.long), torch.as_tensor(held, dtype=torch.long)


@contextmanager
def global_rng_from(generator: torch.Generator) -> Iterator[None]:
    """Inside the block, the global CPU RNG runs on `generator`'s stream (for code that draws
    from it, e.g. module initialisation); outside it is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        yield


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of `probs`."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


class LogsMeans:
    """Mixin for a defense that logs per-step values as epoch means, one row per model:
    `prepare` starts `self._model_means` (a ModelMeans for its K models), `self._means()`
    gives it to the loss, and `end_epoch` returns the epoch's means. Subclasses that override
    prepare call super().prepare(ctxs). List it before Defense: class D(LogsMeans, Defense)."""

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self._model_means: ModelMeans | None = None

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        self._model_means = ModelMeans(len(ctxs))
        return super().prepare(ctxs)

    def _means(self) -> ModelMeans:
        if self._model_means is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctxs); call prepare first")
        return self._model_means

    def end_epoch(self, ctxs: list[TrainContext], epoch: int) -> list[EpochEnd]:
        return [EpochEnd(metrics=means) for means in self._means().pop()]


class ModelMeans:
    """Means of named per-step values over one epoch for each of K >= 1 models, and the share of
    steps in each branch of a relaxed loss term: per-step values are [K] tensors (or, for one
    model, numbers) and branches [K] codes (indices into BRANCHES). Nothing leaves the device
    until `pop` (one dict per model)."""

    def __init__(self, models: int) -> None:
        self.models = int(models)
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._branches: dict[str, torch.Tensor] = {}

    def add(self, **values: torch.Tensor | float | None) -> None:
        """Add one step's [K] values; None values are skipped."""
        for key, value in values.items():
            if value is not None:
                value = value.detach() if isinstance(value, torch.Tensor) \
                    else torch.tensor(float(value), dtype=torch.float64)
                value = value.reshape(self.models)
                self._sums[key] = self._sums[key] + value if key in self._sums else value
                self._counts[key] = self._counts.get(key, 0) + 1

    def add_branch(self, term: str, codes: torch.Tensor | None) -> None:
        """Count one step of loss term `term` in each model's branch (codes [K]; None: skip)."""
        if codes is not None:
            hits = torch.nn.functional.one_hot(codes, len(BRANCHES))
            self._branches[term] = self._branches[term] + hits if term in self._branches \
                else hits

    def pop(self) -> list[dict[str, float]]:
        """Per model: {value: mean} and {frac_<term>_<branch>: share of steps}; then reset."""
        sums = {key: (total.double() / self._counts[key]).tolist()
                for key, total in self._sums.items()}
        shares = {term: (counts / counts.sum(1, keepdim=True)).tolist()
                  for term, counts in self._branches.items()}
        out = []
        for k in range(self.models):
            row = {key: values[k] for key, values in sums.items()}
            for term, share in shares.items():
                row.update({f"frac_{term}_{name}": share[k][b] for b, name in enumerate(BRANCHES)})
            out.append(row)
        self.reset()
        return out
