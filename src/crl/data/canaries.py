"""Canaries for worst-case privacy audits (Aerni, Zhang & Tramer, CCS 2024): N samples appended
to a dataset, which the audit then makes a member of a random half of its models.

    mislabeled   copies of dataset images that lie outside every pool of every seed's split,
                 each relabelled with a fixed, uniformly drawn wrong label (the default)
    noise        uniform-noise images, each with a uniformly drawn label

Draws come from the named stream (seed, 'canaries', KIND), so the canaries depend only on the
dataset, N, KIND and the excluded indices. The dataset with its canaries is a new `ImageData`
with a fresh content hash (so the model-cache key covers them) and the original normalisation.
Canary k is sample `base_size + k` of it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crl.core.canary_spec import KINDS
from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.core.utils import atomic_path, write_json_atomic
from crl.data.limits import check_memory
from crl.data.types import ImageData


@dataclass(frozen=True)
class CanarySet:
    """N canaries appended after the first `base_size` samples of a dataset."""

    kind: str
    base_size: int
    images: torch.Tensor        # uint8 [N, C, H, W]
    labels: np.ndarray          # [N] int64, the labels the models train on
    source: np.ndarray          # [N] dataset index a mislabeled canary copies (-1: generated)
    source_labels: np.ndarray   # [N] the copied image's true label (-1: generated)

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def idx(self) -> np.ndarray:
        """The canaries' indices in the dataset that holds them."""
        return np.arange(self.base_size, self.base_size + self.n, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, "base_size": self.base_size,
                "indices": self.idx.tolist(), "labels": self.labels.tolist(),
                "source": self.source.tolist(), "source_labels": self.source_labels.tolist()}


def _mislabeled(data: ImageData, n: int, exclude: np.ndarray,
                rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    free = np.setdiff1d(np.arange(len(data)), exclude)
    if len(free) < n:
        raise CRLError(f"canaries = {n}:mislabeled: the dataset has {len(free)} images outside "
                       f"every seed's target and shadow pools; expected at least {n} (lower "
                       "--subset or N, or use N:noise)")
    source = np.sort(rng.choice(free, size=n, replace=False))
    true = data.y[source].numpy()
    labels = (true + rng.integers(1, data.num_classes, size=n)) % data.num_classes
    return data.x[source].clone(), labels.astype(np.int64), source.astype(np.int64)


def make_canaries(data: ImageData, n: int, kind: str, exclude: np.ndarray, *,
                  seed: int = 0) -> CanarySet:
    """N canaries of `kind` for `data`; a mislabeled canary never copies an `exclude`d index."""
    if kind not in KINDS:
        raise CRLError(f"canaries kind = {kind!r}: expected one of: {', '.join(KINDS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CRLError(f"canaries = {n!r}: expected an integer >= 2 (half of them are members)")
    if data.num_classes < 2:
        raise CRLError(f"dataset of {data.num_classes} classes: canaries need at least 2")
    # the canaries' images, then the dataset copied with them appended (with_canaries)
    check_memory(f"canaries = {n}:{kind}: {n} images of {'x'.join(map(str, data.shape))}",
                 (2 * int(n) + len(data)) * int(np.prod(data.shape)))
    rng = numpy_rng(seed, "canaries", kind)
    if kind == "mislabeled":
        images, labels, source = _mislabeled(data, int(n), np.asarray(exclude, np.int64), rng)
        true = data.y[source].numpy()
    else:
        images = torch.from_numpy(rng.integers(0, 256, size=(n, *data.shape), dtype=np.uint8))
        labels = rng.integers(0, data.num_classes, size=n).astype(np.int64)
        source = true = np.full(n, -1, np.int64)
    return CanarySet(kind, len(data), images, labels, source, true)


def with_canaries(data: ImageData, canaries: CanarySet) -> ImageData:
    """`data` followed by the canaries: a new dataset (fresh content hash, same normalisation)."""
    if canaries.base_size != len(data):
        raise CRLError(f"canaries were made for a dataset of {canaries.base_size} samples; "
                       f"expected {len(data)} (the dataset they are added to)")
    return ImageData(name=data.name, x=torch.cat([data.x, canaries.images]),
                     y=torch.cat([data.y, torch.from_numpy(canaries.labels)]),
                     num_classes=data.num_classes, mean=data.mean, std=data.std,
                     classes=list(data.classes))


def save_canaries(folder: Path, canaries: CanarySet) -> None:
    """canaries.json (indices, labels, sources) and, for generated canaries, canaries.npy."""
    folder = Path(folder)
    write_json_atomic(folder / "canaries.json", canaries.to_dict())
    if canaries.kind != "mislabeled":
        with atomic_path(folder / "canaries.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, canaries.images.numpy(), allow_pickle=False)


def load_canaries(folder: Path, data: ImageData) -> CanarySet:
    """The CanarySet `save_canaries` wrote, for `data` (the dataset without canaries)."""
    path = Path(folder) / "canaries.json"
    try:
        meta = json.loads(path.read_text())
        if meta["kind"] == "mislabeled":
            images = data.x[np.asarray(meta["source"], np.int64)].clone()
        else:
            images = torch.from_numpy(np.load(Path(folder) / "canaries.npy", allow_pickle=False))
        return CanarySet(meta["kind"], int(meta["base_size"]), images,
                         np.asarray(meta["labels"], np.int64), np.asarray(meta["source"], np.int64),
                         np.asarray(meta["source_labels"], np.int64))
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise CRLError(f"canaries file {path} is unreadable ({type(e).__name__}); expected "
                       "files written by crl audit --canaries") from None
