"""Training losses: CRL (Fang & Kim, UAI 2024) and the original RelaxLoss (Chen et al. 2022).

Each loss exists for one model (`CRLLoss`, `RelaxLoss`) and for K models at once with a leading
model axis (`crl_batched`, `relaxloss_batched`); both are branch-free (no device sync).
"""
from crl.losses.crl import CRLLoss, check_crl_params, crl_batched, normalize
from crl.losses.relaxloss import (
    BRANCHES,
    LossStats,
    RelaxLoss,
    branch_code,
    relaxed_objective,
    relaxloss_batched,
    soft_cross_entropy,
    soft_target,
    target_confidence,
)

__all__ = [
    "BRANCHES",
    "CRLLoss",
    "LossStats",
    "RelaxLoss",
    "branch_code",
    "check_crl_params",
    "crl_batched",
    "normalize",
    "relaxed_objective",
    "relaxloss_batched",
    "soft_cross_entropy",
    "soft_target",
    "target_confidence",
]
