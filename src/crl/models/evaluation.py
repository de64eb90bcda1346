"""Batched evaluation of a model on dataset indices: the one place inputs are batched for
inference (training, defenses, attacks and the audit all use it)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crl.data.types import ImageData, normalize


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def index_batches(model: nn.Module, idx, batch_size: int,
                  inputs: Callable[[torch.Tensor, torch.device], torch.Tensor]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (sample indices, inputs(indices, the model's device)) in batches of `batch_size`,
    with the model in eval mode; its train/eval mode is restored afterwards."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    device = device_of(model)
    with eval_mode(model):
        for start in range(0, idx.numel(), batch_size):
            b = idx[start:start + batch_size]
            yield b, inputs(b, device)


def eval_batches(model: nn.Module, data: ImageData, idx, batch_size: int = 512
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """index_batches over crl's images of `data`, normalised."""
    return index_batches(model, idx, batch_size,
                         lambda b, device: normalize(data.x[b].to(device), data.mean, data.std))


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageData, idx, *, batch_size: int = 512,
                   flip: bool = False, bf16: bool = False) -> torch.Tensor:
    """float32 logits [len(idx), C] on the CPU, in eval mode (optionally on flipped inputs).

    bf16=True computes under bfloat16 autocast (fast monitoring; attacks keep the default).
    """
    out = []
    for _, xb in eval_batches(model, data, idx, batch_size):
        if flip:
            xb = xb.flip(-1)
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0, data.num_classes)


def evaluate(model: nn.Module, data: ImageData, idx, *, batch_size: int = 512,
             bf16: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on data[idx]."""
    logits = predict_logits(model, data, idx, batch_size=batch_size, bf16=bf16).double()
    y = data.y[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
