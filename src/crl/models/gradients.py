"""Input gradients of a model: the white-box signal of the Grad-x attack (crl.attacks.threshold
reads the norms as signals; computing them needs the model, so it happens here, at signal
extraction, and the attacks stay functions of signals)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crl.core.errors import CRLError
from crl.models.evaluation import eval_batches


def input_gradient_norms(model, data, idx, *, batch_size: int = 256) -> np.ndarray:
    """Per-sample L2 norm of d CE(model(x), y) / dx on normalised inputs (float64 result)."""
    out = [batch_gradient_norms(model, x, data.y[b])
           for b, x in eval_batches(model, data, idx, batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def batch_gradient_norms(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of d CE(model(x), y) / dx for one batch (float64, on the CPU)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        if not isinstance(z, torch.Tensor):
            raise CRLError(f"attack 'gradx': model(x) of {type(model).__name__} returned a "
                           f"{type(z).__name__}; expected a tensor of logits")
        loss = F.cross_entropy(z.double(), y.to(x.device), reduction="sum")
        (g,) = (torch.autograd.grad(loss, x, allow_unused=True) if loss.requires_grad
                else (None,))
    if g is None:
        raise CRLError(f"attack 'gradx': the loss of {type(model).__name__} has no gradient "
                       "with respect to its input (its forward detaches x or runs without "
                       "autograd); expected a model differentiable in x, or drop 'gradx' "
                       "from the attacks")
    return g.flatten(1).double().norm(dim=1).cpu()
