"""crl: Center-based Relaxed Learning against membership inference, and an attack suite."""
__version__ = "0.1.0"

from crl.core.errors import CRLError


def load_model(path):
    """The model saved at `path` (weights_only=True: a file cannot run code), in eval mode: a
    crl.models.NormalizedModel that takes float images in [0, 1] (uint8 pixels / 255), warns once
    on other values, and has `.class_names` and `.predict(images)` (PIL / numpy / tensors)."""
    from crl.models.io import load_model as _load

    return _load(path)


_LAZY = {"audit_training": "crl.commands.audit_training", "attack_signals": "crl.audit.from_logits"}


def __getattr__(name: str):
    """`crl.audit_training` and `crl.attack_signals`, imported on first use (a plain
    `import crl` stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crl' has no attribute {name!r}")


__all__ = ["CRLError", "__version__", "attack_signals", "audit_training", "load_model"]
