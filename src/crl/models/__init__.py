"""Models by name, and the feature tap CRL needs."""
from crl.models.features import FeatureTap, last_linear
from crl.models.zoo import create_model

__all__ = ["FeatureTap", "create_model", "last_linear"]
