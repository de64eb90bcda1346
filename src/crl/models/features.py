"""Feature tap: the penultimate features (the input of the model's last nn.Linear) by hook.

Works on unmodified torchvision/timm models; keeps gradients so CRL's center loss can train
through them. Use as a context manager or call `.remove()`.
"""
from __future__ import annotations

import torch
from torch import nn

from crl.errors import CRLError


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last registered nn.Linear of `model` (its classifier head), with its name."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise CRLError(f"{type(model).__name__} has no nn.Linear layer to tap features from")
    return found[-1]


class FeatureTap:
    """Captures the input of one layer (default: the last nn.Linear) on every forward call."""

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        if layer is None:
            self.layer_name, module = last_linear(model)
        else:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise CRLError(f"no layer named '{layer}' in {type(model).__name__}")
            self.layer_name, module = layer, modules[layer]
        self.in_features = getattr(module, "in_features", None)
        self._features: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple) -> None:
        self._features = inputs[0]

    @property
    def features(self) -> torch.Tensor:
        """Features of the most recent forward pass; raises if the hook never fired."""
        if self._features is None:
            raise CRLError(
                f"feature tap on '{self.layer_name}' never fired: the model's forward did not "
                "call that layer (pass layer=... to tap another one)"
            )
        return self._features

    def pop(self) -> torch.Tensor:
        """Return the captured features and clear them, so a stale value is never reused."""
        f = self.features
        self._features = None
        return f

    def remove(self) -> None:
        self._handle.remove()
        self._features = None

    def __enter__(self) -> "FeatureTap":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
