"""Defenses; importing this package registers them all."""
from crl.defenses.base import CrossEntropy, Defense, FitContext, build_defense

for _module in ("crl", "relaxloss", "label_smoothing", "confidence_penalty", "early_stopping",
                "advreg", "dmp", "dpsgd"):
    try:
        __import__(f"crl.defenses.{_module}")
    except ModuleNotFoundError as _e:   # not written yet in this checkout
        if _e.name != f"crl.defenses.{_module}":
            raise

__all__ = ["CrossEntropy", "Defense", "FitContext", "build_defense"]
