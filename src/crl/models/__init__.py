"""Models by name, their one description (ModelSpec), model files, and the feature tap CRL needs."""
from crl.models.features import FeatureTap, classifier_of, last_linear
from crl.models.io import load_model, load_model_file, save_model
from crl.models.spec import ModelSpec, NormalizedModel
from crl.models.zoo import create_model

__all__ = ["FeatureTap", "ModelSpec", "NormalizedModel", "classifier_of", "create_model",
           "last_linear", "load_model", "load_model_file", "save_model"]
