"""Batched, seeded training augmentation: random crop with zero padding and horizontal flip."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from crl.core.errors import CRLError


def _check_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise CRLError(f"{what} input of shape {shape}: expected a tensor [B, C, H, W]")


def flip_batch(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of every image in a [B, C, H, W] batch."""
    _check_batch(x, "flip_batch")
    return x.flip(-1)


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Per-sample random crop (zero padding of `pad` pixels) and random horizontal flip.

    x: float [B, C, H, W], already normalised, on any device (padding is 0 in normalised
    space). Random numbers come from the CPU `generator`, so the result depends only on its
    state. pad=0 and flip=False return x unchanged.
    """
    _check_batch(x, "augment_batch")
    if not x.is_floating_point():
        raise CRLError(f"augment_batch input of dtype {x.dtype}: expected a float tensor")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise CRLError(f"augment pad={pad!r}: expected an integer >= 0")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise CRLError(f"augment generator {generator!r}: expected a CPU torch.Generator")
    if pad == 0 and not flip:
        return x
    b, _, h, w = x.shape
    dev = x.device
    if pad:
        shifts = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(dev)
    else:
        shifts = torch.zeros(2, b, dtype=torch.long, device=dev)
    rows = shifts[0, :, None] + torch.arange(h, device=dev)            # [B, H]
    cols = shifts[1, :, None] + torch.arange(w, device=dev)            # [B, W]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(dev)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    src = F.pad(x, (pad, pad, pad, pad)) if pad else x
    # Gather rows, then columns: [B, C, H+2p, W+2p] -> [B, C, H, W+2p] -> [B, C, H, W].
    c = x.shape[1]
    src = src.gather(2, rows[:, None, :, None].expand(b, c, h, src.shape[3]))
    return src.gather(3, cols[:, None, None, :].expand(b, c, h, w))
