"""The model `crl.load_model` returns: a NormalizedModel that knows its class names, warns once
when its inputs leave [0, 1], and predicts from PIL images, numpy arrays or tensors.

    model = crl.load_model("runs/train/model.pt")
    out = model.predict(images)      # out.labels, out.names (None if the file has none), out.probs

`predict` converts its input to what the network expects: numpy arrays are HW, HWC or NHWC
(PIL / OpenCV layout), torch tensors CHW or NCHW; uint8 values are divided by 255, float values
are taken as they are (they must already lie in [0, 1]); RGBA drops alpha, grey is repeated to
RGB, RGB becomes grey with ITU-R 601 luma weights (PIL's "L"); other sizes are resized
bilinearly (antialiased) to the model's square size, stretching non-square images.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.models.spec import ModelSpec, NormalizedModel

_LUMA = (0.299, 0.587, 0.114)
_SLACK = 1e-6   # float rounding tolerated at the ends of [0, 1]


@dataclass
class Predictions:
    labels: np.ndarray            # int64 [N]: predicted class indices
    names: list[str] | None       # the class names of `labels`, when the model file stores them
    probs: np.ndarray             # float32 [N, num_classes]: softmax probabilities


class DeployedModel(NormalizedModel):
    """NormalizedModel plus `class_names` (tuple or None) and `predict`."""

    def __init__(self, net: nn.Module, spec: ModelSpec,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__(net, spec)
        self.class_names = None if class_names is None else tuple(class_names)
        self._range_warned = False

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        z = super().normalize(x)
        if not self._range_warned and x.numel():
            lo, hi = float(x.min()), float(x.max())
            if lo < -_SLACK or hi > 1 + _SLACK:
                self._range_warned = True
                warnings.warn(f"crl model input has values in [{lo:g}, {hi:g}]: expected images "
                              "in [0, 1] (uint8 pixels / 255); predictions on other ranges are "
                              "wrong (model.predict converts uint8 images)", UserWarning,
                              stacklevel=3)
        return z

    def predict(self, images: Any, batch_size: int = 512) -> Predictions:
        """Predicted labels, class names and probabilities for `images` (module docstring)."""
        x = as_model_input(images, self.spec)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                logits = [self(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)]
        finally:
            self.train(was_training)
        probs = torch.softmax(torch.cat(logits), dim=1) if logits else \
            torch.empty(0, self.spec.num_classes)
        labels = probs.argmax(1).numpy().astype(np.int64)
        names = None if self.class_names is None else [self.class_names[i] for i in labels]
        return Predictions(labels, names, probs.numpy())


def as_model_input(images: Any, spec: ModelSpec) -> torch.Tensor:
    """`images` (PIL image(s), numpy HW/HWC/NHWC, torch CHW/NCHW, or a list of these) as a float
    [N, C, S, S] tensor for `spec`: channels converted, resized; uint8 scaled by 1/255."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise CRLError("images = []: expected at least one image")
        return torch.cat([as_model_input(im, spec) for im in images])
    x = _as_nchw(images, spec.in_channels)
    x = _with_channels(x, spec.in_channels)
    if tuple(x.shape[2:]) != (spec.image_size, spec.image_size):
        x = F.interpolate(x, size=(spec.image_size, spec.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
    return x


def _as_nchw(images: Any, channels: int) -> torch.Tensor:
    """A float NCHW tensor (uint8 scaled to [0, 1], other values unchanged)."""
    if _is_pil(images):
        images = np.array(images.convert("L" if channels == 1 else "RGB"))
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(_nhwc(images)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        if images.dim() not in (3, 4):
            raise CRLError(f"images = tensor of shape {list(images.shape)}: expected CHW or "
                           "NCHW")
        x = images.unsqueeze(0) if images.dim() == 3 else images
    else:
        raise CRLError(f"images = {type(images).__name__}: expected a PIL image, a numpy array, "
                       "a torch tensor or a list of these")
    if x.dtype == torch.uint8:
        return x.float() / 255
    if x.dtype == torch.bool or x.is_complex():
        raise CRLError(f"images have dtype {x.dtype}: expected uint8 or float pixels")
    return x.float()


def _nhwc(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return np.ascontiguousarray(a[None, :, :, None])
    if a.ndim == 3:   # HWC when the last axis looks like channels, else a batch of grey NHW
        return np.ascontiguousarray(a[None] if a.shape[-1] in (1, 3, 4) else a[..., None])
    if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        return np.ascontiguousarray(a)
    raise CRLError(f"images = array of shape {list(a.shape)}: expected HW, HWC or NHWC "
                   "(numpy arrays use the PIL layout; pass CHW data as a torch tensor)")


def _with_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    have = x.shape[1]
    if have == 4:
        x, have = x[:, :3], 3
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if have == 3 and channels == 1:
        return (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    raise CRLError(f"images have {have} channels: the model takes {channels}")


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)
