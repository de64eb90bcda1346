"""Training losses: CRL (Fang & Kim, UAI 2024) and the original RelaxLoss (Chen et al. 2022)."""
from crl.losses.crl import CRLLoss, check_crl_params, normalize
from crl.losses.relaxloss import (
    BRANCHES,
    RelaxLoss,
    relaxed_objective,
    soft_cross_entropy,
    soft_target,
    target_confidence,
)

__all__ = [
    "BRANCHES",
    "CRLLoss",
    "RelaxLoss",
    "check_crl_params",
    "normalize",
    "relaxed_objective",
    "soft_cross_entropy",
    "soft_target",
    "target_confidence",
]
