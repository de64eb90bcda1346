"""Helpers shared by the baseline defenses: hyper-parameter checks and member-set splits."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from crl.errors import CRLError


def check_number(owner: str, name: str, value: Any, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float inside the given interval, else a one-line CRLError."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    where = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise CRLError(f"{owner}.{name}={value!r}: expected a number in {where}")
    return float(value)


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1,
              allow_none: bool = False) -> int | None:
    """`value` as an int >= minimum (or None if allowed), else a one-line CRLError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or null" if allow_none else ""
        raise CRLError(f"{owner}.{name}={value!r}: expected an integer >= {minimum}{extra}")
    return int(value)


def split_members(train_idx: torch.Tensor, labels: torch.Tensor, fraction: float, *, seed: int,
                  salt: int, owner: str, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of the members `train_idx` into (kept, held_out); `labels`
    are the labels of the whole dataset (indexed by dataset index).

    `fraction` of the members is held out (rounded; at least one sample must land on each
    side). Only members are ever drawn from, so non-members stay untouched for the audit.
    """
    from crl.data.splits import _stratified_take

    idx = np.sort(train_idx.cpu().numpy().astype(np.int64))
    n = idx.size
    k = int(round(fraction * n))
    if not 1 <= k <= n - 1:
        raise CRLError(f"{owner}.{param}={fraction} holds out {k} of {n} training samples; "
                       "expected at least 1 held out and 1 left to train on")
    rng = np.random.default_rng([int(seed), int(salt)])
    held, kept = _stratified_take(idx, labels.cpu().numpy().astype(np.int64), k, rng)
    return torch.as_tensor(kept, dtype=torch.long), torch.as_tensor(held, dtype=torch.long)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of `probs`."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(1)


class Means:
    """Running means of named per-step values, reset after each read (for extra_metrics)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
            self._counts[k] = self._counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: self._sums[k] / self._counts[k] for k in self._sums}
        self._sums, self._counts = {}, {}
        return out
