"""The in-memory dataset type every other module consumes, its content hash and normalisation."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

CONTENT_HASH_FORMAT = "crl-content-1"
_HASH_CHUNK = 4096  # images hashed per step (bounded extra memory for tensors off the CPU)


def content_digest(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str],
                   num_classes: int) -> str:
    """sha256 (hex) over the uint8 images, the labels, the class names and num_classes.

    Two datasets with equal digests hold the same pixels with the same labels and classes,
    whatever their name, path or file format.
    """
    h = hashlib.sha256(CONTENT_HASH_FORMAT.encode())
    header = {"x": [str(x.dtype), list(x.shape)], "y": [str(y.dtype), list(y.shape)],
              "classes": [str(c) for c in classes], "num_classes": int(num_classes)}
    h.update(json.dumps(header, sort_keys=True).encode())
    for part in torch.split(x.detach(), _HASH_CHUNK):
        h.update(part.cpu().contiguous().numpy())
    h.update(y.detach().cpu().contiguous().numpy().astype("<i8", copy=False))
    return h.hexdigest()


@dataclass
class ImageData:
    """A whole dataset (train and test merged) as tensors.

    x: uint8 images [N, C, H, W]; y: int64 labels [N] in [0, num_classes).
    mean/std: per-channel normalisation on the [0, 1] scale (len C).
    content_hash: `content_digest` of x, y, classes and num_classes. Loaders pass the one
    computed when the data was decoded; left empty, it is computed here. It describes the data
    at construction: modify x or y in place and it no longer does (build a new ImageData; with
    dataclasses.replace, pass content_hash="" alongside the new x or y).
    train_size: the samples are the source's own train split followed by its test split, and
    the first `train_size` of them are the train split (torchvision's train/test files,
    imagefolder's train/ and test/ folders); None when the source has no split of its own
    (digits). Not part of the content hash: it says where the data came from, not what it is.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    content_hash: str = ""
    train_size: int | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError("ImageData.x must be uint8 [N, C, H, W], "
                             f"got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError("ImageData.y must be int64 [N], "
                             f"got {self.y.dtype} {tuple(self.y.shape)}")
        if self.train_size is not None and not 0 <= self.train_size <= self.x.shape[0]:
            raise ValueError(f"ImageData.train_size must lie in [0, {self.x.shape[0]}], "
                             f"got {self.train_size}")
        if not self.content_hash:
            self.content_hash = content_digest(self.x, self.y, self.classes, self.num_classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def channel_stats(x: torch.Tensor, chunk: int = 4096
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (population) of uint8 [N, C, H, W] images on the [0, 1] scale.

    A constant channel gets std 1.0 so normalising never divides by zero.
    """
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for part in torch.split(x, chunk):
        p = part.to(torch.float64).div_(255.0)
        s += p.sum(dim=(0, 2, 3))
        s2 += p.square_().sum(dim=(0, 2, 3))
    count = max(x.shape[0] * x.shape[2] * x.shape[3], 1)
    mean = s / count
    var = (s2 / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised; works on any device."""
    x = x_uint8.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
