"""Signals: what every score-based attack consumes (ML Privacy Meter's shape).

logits[models, samples, classes] of every model on every sample of one pool, and
member[models, samples] saying which samples each model trained on. Models on the first axis.
held_out[models, samples] marks samples a model was handed but held out from training (a
defense's validation or reference split, DMP's teacher half): "touched, not trained on", so
neither IN nor OUT for that model. Attacks leave them out of that model's reference fits, and
pooled metrics leave those (model, sample) pairs out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crl.core.errors import CRLError


@dataclass
class Signals:
    logits: np.ndarray            # [M, N, C] float
    member: np.ndarray            # [M, N] bool
    labels: np.ndarray            # [N] int
    sample_idx: np.ndarray        # [N] dataset indices of the samples
    logits_flip: np.ndarray | None = None   # [M, N, C] logits on horizontally flipped inputs
    held_out: np.ndarray | None = None      # [M, N] bool, touched but not trained on (None: none)

    def __post_init__(self) -> None:
        self.logits = np.asarray(self.logits)
        self.member = np.asarray(self.member).astype(bool)
        self.labels = np.asarray(self.labels).astype(np.int64)
        self.sample_idx = np.asarray(self.sample_idx).astype(np.int64)
        if self.logits.ndim != 3:
            raise CRLError("signals logits must be [models, samples, classes], "
                           f"got {list(self.logits.shape)}")
        m, n, c = self.logits.shape
        if self.member.shape != (m, n):
            raise CRLError(f"membership matrix must be [{m}, {n}], got {list(self.member.shape)}")
        self.held_out = (np.zeros((m, n), bool) if self.held_out is None
                         else np.asarray(self.held_out).astype(bool))
        if self.held_out.shape != (m, n):
            raise CRLError(f"held-out matrix must be [{m}, {n}], got {list(self.held_out.shape)}")
        if (self.held_out & self.member).any():
            raise CRLError("held-out samples must not be members of the same model; expected "
                           "held_out and member to be disjoint")
        if self.labels.shape != (n,) or self.sample_idx.shape != (n,):
            raise CRLError(f"labels and sample_idx must have {n} entries, got "
                           f"{self.labels.shape[0]} and {self.sample_idx.shape[0]}")
        if n and (self.labels.min() < 0 or self.labels.max() >= c):
            raise CRLError(f"labels must lie in [0, {c}), got range "
                           f"[{self.labels.min()}, {self.labels.max()}]")
        if self.logits_flip is not None:
            self.logits_flip = np.asarray(self.logits_flip)
            if self.logits_flip.shape != self.logits.shape:
                raise CRLError(f"flipped logits {list(self.logits_flip.shape)} differ from "
                               f"logits {list(self.logits.shape)}")

    @property
    def num_models(self) -> int:
        return int(self.logits.shape[0])

    @property
    def outside(self) -> np.ndarray:
        """[M, N] bool: OUT for that model (neither trained on nor held out)."""
        return ~self.member & ~self.held_out

    @staticmethod
    def merge(parts: list[Signals]) -> Signals:
        """Stack the models of several Signals over the SAME samples in the SAME order.

        Signals computed on a different sample order (or other samples) are refused: pairing
        logits with another sample's membership would silently corrupt every attack.
        """
        if not parts:
            raise CRLError("Signals.merge needs at least one Signals")
        first = parts[0]
        for k, p in enumerate(parts[1:], start=1):
            if p.sample_idx.shape != first.sample_idx.shape or not np.array_equal(
                    p.sample_idx, first.sample_idx):
                raise CRLError(f"signals part {k} covers other samples or another sample order "
                               f"than part 0; expected the same sample_idx")
            if not np.array_equal(p.labels, first.labels):
                raise CRLError(f"signals part {k} has other labels than part 0 "
                               f"for the same samples")
            if p.logits.shape[2] != first.logits.shape[2]:
                raise CRLError(f"signals part {k} has {p.logits.shape[2]} classes, "
                               f"expected {first.logits.shape[2]}")
        flips = [p.logits_flip for p in parts]
        if any(f is None for f in flips) and not all(f is None for f in flips):
            raise CRLError("some signals parts have flipped logits and some do not")
        return Signals(np.concatenate([p.logits for p in parts]),
                       np.concatenate([p.member for p in parts]), first.labels, first.sample_idx,
                       None if flips[0] is None else np.concatenate(flips),
                       np.concatenate([p.held_out for p in parts]))
