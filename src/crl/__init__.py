"""crl: Center-based Relaxed Learning against membership inference, and an attack suite."""
__version__ = "0.1.0"

from crl.errors import CRLError  # noqa: E402


def load_model(path):
    """The model saved at `path` (weights_only=True: a file cannot run code), in eval mode: a
    crl.models.NormalizedModel that takes float images in [0, 1] (uint8 pixels / 255)."""
    from crl.models.io import load_model as _load

    return _load(path)


__all__ = ["CRLError", "load_model", "__version__"]
