"""The classifier head of a model, and a tap on its input (the penultimate features) by hook.

`classifier_of` finds the head explicitly (timm's `get_classifier()`, or the head a crl model
factory recorded as `crl_head`) and falls back to the last nn.Linear for foreign models, so
unmodified torchvision/timm models work. The tap keeps gradients so CRL's center loss can train
through the features. Use it as a context manager or call `.remove()`.
"""
from __future__ import annotations

import torch
from torch import nn

from crl.core.errors import CRLError


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last registered nn.Linear of `model`, with its name (the fallback classifier head)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise CRLError(f"{type(model).__name__} has no nn.Linear layer to tap features from")
    return found[-1]


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head of `model` and its name within `model`.

    In order: `get_classifier()` when the model's class has it (timm), else the submodule a crl
    factory recorded as `crl_head`, else the last nn.Linear. Wrappers that hold the model as their
    only child (NormalizedModel, Opacus's GradSampleModule, DataParallel) are looked through.
    """
    head = _declared_head(model)
    if head is None:
        return last_linear(model)
    name = next((n for n, m in model.named_modules() if m is head), None)
    if name is None:
        raise CRLError(f"the classifier {type(model).__name__} declares is not one of its modules")
    if not isinstance(head, nn.Linear):
        raise CRLError(f"{type(model).__name__}'s classifier '{name}' is a "
                       f"{type(head).__name__}; expected an nn.Linear head")
    return name, head


def _declared_head(model: nn.Module) -> nn.Module | None:
    """The head `model` (or the model inside a chain of one-child wrappers) declares, if any."""
    m = model
    while True:
        if callable(getattr(type(m), "get_classifier", None)):
            return m.get_classifier()
        recorded = vars(m).get("crl_head")
        if isinstance(recorded, str):
            modules = dict(m.named_modules())
            if recorded not in modules:
                raise CRLError(f"{type(m).__name__} records its classifier as '{recorded}', "
                               "which is not one of its layers")
            return modules[recorded]
        children = list(m.children())
        if len(children) != 1:
            return None
        m = children[0]


class FeatureTap:
    """Captures the input of one layer (default: the classifier head, `classifier_of(model)`) on
    every forward call."""

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        if layer is None:
            self.layer_name, module = classifier_of(model)
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

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
