"""Defenses; importing this package registers them all."""
from crl.defenses import (  # noqa: F401  (registration)
    advreg,
    confidence_penalty,
    crl,
    dmp,
    dpsgd,
    early_stopping,
    hamp,
    label_smoothing,
    relaxloss,
)
from crl.defenses.base import (
    Changes,
    CrossEntropy,
    Defense,
    EpochEnd,
    Step,
    TrainContext,
    build_defense,
)

__all__ = ["Changes", "CrossEntropy", "Defense", "EpochEnd", "Step", "TrainContext",
           "build_defense"]
