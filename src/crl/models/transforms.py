"""Registered module transforms: changes applied to a freshly built model that a saved model
must replay on load (they are recorded by name in its ModelSpec)."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from crl.core.errors import CRLError
from crl.core.registry import Registry

MODEL_TRANSFORMS: Registry = Registry("model transform")


def _opacus_validator():
    try:
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise CRLError("dpsgd needs opacus: pip install 'crl[dp]'") from e
    return ModuleValidator


@MODEL_TRANSFORMS.register("opacus_fix")
def opacus_compatible(model: nn.Module) -> nn.Module:
    """`model` made acceptable to Opacus: BatchNorm -> GroupNorm etc. (a new module when anything
    had to change) and in-place activations switched off (Opacus's hooks forbid them)."""
    validator = _opacus_validator()
    if validator.validate(model, strict=False):
        fixed = validator.fix(model)
        errors = validator.validate(fixed, strict=False)
        if errors:
            raise CRLError(f"dpsgd cannot make {type(model).__name__} Opacus-compatible: "
                           f"{str(errors[0]).splitlines()[0]}")
        model = fixed
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return model


def apply_transforms(model: nn.Module, names) -> nn.Module:
    """Apply the registered transforms `names`, in order."""
    for name in names:
        fn: Callable[[nn.Module], nn.Module] = MODEL_TRANSFORMS.get(name)
        model = fn(model)
    return model
