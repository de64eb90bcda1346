"""One description of a model, shared by creating, saving, loading and the audit's cache key.

`ModelSpec` says which registered network to build for which images (channels, size, classes),
how those images are normalised, and which registered transforms (e.g. `opacus_fix`) were
applied after building. `NormalizedModel` wraps a raw network with its spec so that it takes
images as floats in [0, 1] (torchvision's ToTensor convention: stored uint8 pixels / 255).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from crl.core.errors import CRLError
from crl.core.params import Param
from crl.core.registry import MODELS
from crl.models import output_modification  # noqa: F401  (registers 'hamp_output')
from crl.models.features import FeatureTap, classifier_of
from crl.models.transforms import MODEL_TRANSFORMS, apply_transforms
from crl.models.zoo import create_model

FIELDS = ("arch", "in_channels", "image_size", "num_classes", "mean", "std", "transforms")


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture for [B, in_channels, image_size, image_size] images with
    `num_classes` classes; mean/std: per-channel normalisation on the [0, 1] scale; transforms:
    registered model transforms applied, in order, after building."""

    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transforms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checked = _checked_fields({f: getattr(self, f) for f in FIELDS}, "model spec")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: Any, source: str = "model spec") -> ModelSpec:
        """The spec `d` (as written by `to_dict`) describes; every field is checked and a bad
        one is a one-line CRLError starting with `source` (e.g. 'model file runs/m.pt')."""
        if not isinstance(d, Mapping):
            raise CRLError(f"{source}: spec = {_short(d)}: expected a mapping with the fields "
                           f"{', '.join(FIELDS)}")
        unknown = [k for k in d if k not in FIELDS]
        if unknown:
            raise CRLError(f"{source}: unknown spec field {unknown[0]!r}; expected: "
                           f"{', '.join(FIELDS)}")
        missing = [f for f in FIELDS if f not in d]
        if missing:
            raise CRLError(f"{source}: the spec has no {missing[0]!r} field")
        return cls(**_checked_fields(dict(d), source))

    @classmethod
    def for_data(cls, arch: str, data) -> ModelSpec:
        """The spec of `arch` for an ImageData `data` (its channels, size, classes, mean, std)."""
        channels, height, width = data.shape
        if height != width:
            raise CRLError(f"dataset {data.name} has {height}x{width} images; the models "
                           "expect square images")
        return cls(arch, channels, height, data.num_classes, tuple(data.mean), tuple(data.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (JSON- and weights_only-safe): the file header and the cache key."""
        return {"arch": self.arch, "in_channels": self.in_channels,
                "image_size": self.image_size, "num_classes": self.num_classes,
                "mean": list(self.mean), "std": list(self.std),
                "transforms": list(self.transforms)}

    def with_transform(self, name: str) -> ModelSpec:
        """This spec with the registered transform `name` appended (unchanged if present)."""
        if name in self.transforms:
            return self
        return dataclasses.replace(self, transforms=self.transforms + (name,))

    def build(self) -> nn.Module:
        """A freshly initialised raw network (it expects normalised inputs)."""
        model = create_model(self.arch, self.in_channels, self.image_size, self.num_classes)
        return apply_transforms(model, self.transforms)

    def input_description(self) -> dict[str, Any]:
        """The images the model takes (as NormalizedModel): float [batch, channels, height,
        width] tensors with values in [0, 1]; written into model files for their readers."""
        return {"layout": "NCHW", "channels": self.in_channels, "height": self.image_size,
                "width": self.image_size, "value_range": [0.0, 1.0]}

    def describe(self) -> str:
        """Short words for error messages, e.g. 'mlp, 1x8x8 images, 10 classes'."""
        return (f"{self.arch}, {self.in_channels}x{self.image_size}x{self.image_size} images, "
                f"{self.num_classes} classes")


def _checked_fields(d: dict, source: str) -> dict[str, Any]:
    """Every spec field of `d` checked and converted (tuples for the sequences)."""
    scalars = (Param("arch", None, kind=str, choices=tuple(MODELS.names())),
               Param("in_channels", None, kind=int, low=1),
               Param("image_size", None, kind=int, low=1),
               Param("num_classes", None, kind=int, low=2))
    out = {p.name: _checked(source, d[p.name], p) for p in scalars}
    channels = out["in_channels"]
    lists = ((Param("mean", None, kind=float), channels),
             (Param("std", None, kind=float, low=0, low_open=True), channels),
             (Param("transforms", None, kind=str, choices=tuple(MODEL_TRANSFORMS.names())), None))
    for param, length in lists:
        out[param.name] = _checked_list(source, d[param.name], param, length)
    return out


def _checked(source: str, value: Any, param: Param) -> Any:
    """`value` converted by `param`, else 'SOURCE: NAME = VALUE: expected ...'."""
    try:
        return param.check(source, value)
    except CRLError:
        raise CRLError(f"{source}: {param.name} = {_short(value)}: "
                       f"expected {param.expected()}") from None


def _checked_list(source: str, value: Any, item: Param, length: int | None = None) -> tuple:
    """`value` (named item.name) as a tuple of `item` values (exactly `length` when given)."""
    count = "" if length is None else f"{length} "
    expected = f"expected a list of {count}values, each {item.expected()}"
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
        raise CRLError(f"{source}: {item.name} = {_short(value)}: {expected}")
    try:
        return tuple(item.check(source, v) for v in value)
    except CRLError:
        raise CRLError(f"{source}: {item.name} = {_short(value)}: {expected}") from None


def _short(value: Any, limit: int = 80) -> str:
    """repr of `value`, cut to one short line (a corrupt header may hold anything)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class NormalizedModel(nn.Module):
    """A raw network (`.net`) with its spec (`.spec`): takes float images in [0, 1] (stored uint8
    pixels / 255), normalises them with the spec's mean/std and returns logits."""

    def __init__(self, net: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise CRLError(f"NormalizedModel needs a ModelSpec, got {type(spec).__name__}")
        self.net = net
        self.spec = spec
        shape = (1, spec.in_channels, 1, 1)
        self.register_buffer("mean", torch.tensor(spec.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(shape), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the network's normalised inputs (shape and dtype checked)."""
        s = self.spec
        expected = (s.in_channels, s.image_size, s.image_size)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise CRLError(f"{s.arch} model input has shape {shape}: expected "
                           f"[batch, {', '.join(map(str, expected))}] images")
        if not x.is_floating_point():
            raise CRLError(f"{s.arch} model input has dtype {x.dtype}: expected float images "
                           "in [0, 1] (uint8 pixels / 255)")
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features (the classifier's input) for images in [0, 1]."""
        with FeatureTap(self.net) as tap:
            self.net(self.normalize(x))
            return tap.pop()

    @property
    def classifier(self) -> nn.Linear:
        """The classifier head of the network."""
        return classifier_of(self.net)[1]
