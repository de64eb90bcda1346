"""Shared numerics for the reference-model attacks (LiRA, RMIA): float64, log-space.

Every function takes logits of shape [..., N, C] (any leading axes, e.g. models) and labels [N],
and returns float64 arrays of shape [..., N]. Nothing goes through a float32 softmax, so a
prediction with a logit margin of 50 or more keeps a distinct, finite score instead of rounding
to p = 1 and tying with every other confident prediction.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from crl.core.errors import CRLError


def check_logits(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 logits [..., N, C] and int64 labels [N]; CRLError otherwise."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim < 2 or z.shape[-1] < 2:
        raise CRLError(f"logits must be [..., samples, classes>=2], got shape {list(z.shape)}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != z.shape[-2]:
        raise CRLError(f"labels must be [{z.shape[-2]}] (one per sample), "
                       f"got shape {list(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise CRLError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    c = z.shape[-1]
    if y.size and (y.min() < 0 or y.max() >= c):
        raise CRLError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")
    if not np.isfinite(z).all():
        raise CRLError(f"{int((~np.isfinite(z)).sum())} logits are NaN or infinite")
    return z, y


def logit_confidence(logits, labels) -> np.ndarray:
    """log p_y - log(1 - p_y) = z_y - logsumexp_{i != y} z_i (LiRA's logit scaling), float64.

    Exact for any margin: no probability is ever formed, so huge margins stay distinct.
    """
    z, y = check_logits(logits, labels)
    n = z.shape[-2]
    idx = np.arange(n)
    z_true = z[..., idx, y]
    others = z.copy()
    others[..., idx, y] = -np.inf
    return z_true - logsumexp(others, axis=-1)


def log_prob_true(logits, labels) -> np.ndarray:
    """log p_y = log softmax(z)_y, float64; accurate also when p_y is within 1e-20 of 1.

    Computed as log sigmoid(logit_confidence) = -log1p(exp(-lc)), which keeps the tiny mass of
    the other classes (z_y - logsumexp(z) would round it away for large margins).
    """
    lc = logit_confidence(logits, labels)
    return -np.logaddexp(0.0, -lc)
