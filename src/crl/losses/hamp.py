"""HAMP's training loss (Chen & Pattabiraman, NDSS 2024).

High-entropy soft labels: the true class gets probability p, each of the other C - 1 classes
(1 - p) / (C - 1), with p the largest value whose label entropy reaches the threshold
gamma * log C (gamma in [0, 1): the fraction of the maximum entropy, that of the uniform label).

Loss of a batch: the KL divergence from the soft label to the model's prediction, minus alpha
times the prediction's entropy (the entropy regulariser), both averaged over the batch:

    L = mean_i [ KL(y_soft_i || softmax(z_i)) - alpha * H(softmax(z_i)) ]

The KL term sums over the classes (the paper's KL divergence). The authors' code averages it
over the classes too (PyTorch's kl_div with reduction 'mean'), so an alpha of theirs equals C
times that alpha here (see docs/defenses.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from crl.core.errors import CRLError


def label_entropy(p: float, num_classes: int) -> float:
    """Entropy (nats) of the soft label with p on the true class, the rest spread evenly."""
    rest = (1.0 - p) / (num_classes - 1)
    return -sum(q * math.log(q) for q in (p, *([rest] * (num_classes - 1))) if q > 0)


def soft_label_confidence(num_classes: int, gamma: float) -> float:
    """The largest p in [1/C, 1] whose soft label has entropy >= gamma * log C (bisection; the
    entropy decreases from log C at p = 1/C to 0 at p = 1)."""
    if num_classes < 2:
        raise CRLError(f"hamp: num_classes = {num_classes}: expected at least 2 classes")
    if not 0.0 <= gamma < 1.0:
        raise CRLError(f"hamp.gamma = {gamma!r}: expected a number in [0, 1)")
    target = gamma * math.log(num_classes)
    low, high = 1.0 / num_classes, 1.0          # entropy(low) >= target > entropy(high) or ==
    if label_entropy(high, num_classes) >= target:
        return 1.0
    for _ in range(100):
        mid = 0.5 * (low + high)
        if label_entropy(mid, num_classes) >= target:
            low = mid
        else:
            high = mid
    return low


def soft_labels(y: torch.Tensor, num_classes: int, p: float) -> torch.Tensor:
    """[..., C] soft labels for the labels `y` [...]: p on the true class, the rest evenly."""
    rest = (1.0 - p) / (num_classes - 1)
    out = torch.full((*y.shape, num_classes), rest, dtype=torch.float32, device=y.device)
    return out.scatter_(-1, y.unsqueeze(-1), p)


def hamp_loss(logits: torch.Tensor, y: torch.Tensor, p: float, alpha: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, mean KL term, mean entropy) of a batch per model: logits [..., B, C], labels
    [..., B] -> three [...] tensors (one model: logits [B, C] -> 0-d)."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    target = soft_labels(y, logits.shape[-1], p)
    kl = (torch.special.xlogy(target, target) - target * log_q).sum(-1).mean(-1)
    entropy = -(log_q.exp() * log_q).sum(-1).mean(-1)
    return kl - alpha * entropy, kl, entropy
