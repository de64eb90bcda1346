"""The in-memory dataset type every other module consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageData:
    """A whole dataset (train and test merged) as tensors.

    x: uint8 images [N, C, H, W]; y: int64 labels [N] in [0, num_classes).
    mean/std: per-channel normalisation on the [0, 1] scale (len C).
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"ImageData.x must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"ImageData.y must be int64 [N], got {self.y.dtype} {tuple(self.y.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 normalised; works on any device."""
    x = x_uint8.float().div_(255.0)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
