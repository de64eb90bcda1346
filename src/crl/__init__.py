"""crl: Center-based Relaxed Learning against membership inference, and an attack suite."""
__version__ = "0.1.0"

from crl.errors import CRLError  # noqa: E402


def load_model(path):  # noqa: D401
    """Return the trained nn.Module saved at `path` (loaded with weights_only=True)."""
    from crl.train import load_model as _load

    return _load(path)


__all__ = ["CRLError", "load_model", "__version__"]
