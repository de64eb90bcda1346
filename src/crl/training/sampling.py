"""Batch samplers: which dataset indices form each training step's batch in one epoch.

`fit` uses `ShuffledBatches` (a random permutation cut into consecutive batches); a defense may
replace it in `prepare` (DP-SGD installs `PoissonBatches`, the sampling its accountant assumes).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from crl.core.errors import CRLError


class BatchSampler(Protocol):
    def batches(self, train_idx: torch.Tensor, generator: torch.Generator
                ) -> Iterator[torch.Tensor]:
        """The batches of one epoch, drawn with `generator` (a CPU torch.Generator)."""
        ...


class ShuffledBatches:
    """A random permutation of the training indices cut into batches of `batch_size`."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)

    def batches(self, train_idx: torch.Tensor, generator: torch.Generator
                ) -> Iterator[torch.Tensor]:
        n = train_idx.numel()
        perm = train_idx[torch.randperm(n, generator=generator)]
        for start in range(0, n, self.batch_size):
            yield perm[start:start + self.batch_size]


class PoissonBatches:
    """Poisson subsampling: every sample joins each batch independently with probability
    `sample_rate`; `num_batches` batches an epoch (batches may be empty)."""

    def __init__(self, sample_rate: float, num_batches: int) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise CRLError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
        if num_batches < 1:
            raise CRLError(f"num_batches = {num_batches!r}: expected an integer >= 1")
        self.sample_rate = float(sample_rate)
        self.num_batches = int(num_batches)

    def batches(self, train_idx: torch.Tensor, generator: torch.Generator
                ) -> Iterator[torch.Tensor]:
        n = train_idx.numel()
        for _ in range(self.num_batches):
            yield train_idx[torch.rand(n, generator=generator) < self.sample_rate]
