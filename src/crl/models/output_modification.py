"""HAMP's test-time output modification (Chen & Pattabiraman, NDSS 2024), as a model
transform recorded in the ModelSpec so that every copy of a released model applies it.

HAMP answers a query x with the scores the model gives a random input, rearranged so that their
ranking over the classes is the ranking of the model's own scores on x: the predicted label (and
the whole class ranking) is kept, the confidence values are those of a random input.

Here the random input is drawn once per model when training ends (from the model's own seed) and
its logits are stored, sorted in decreasing order, as the buffer `hamp_scores` of the network;
a forward hook then rearranges every output. The released weights never change after training,
so storing the random input's logits gives the same answers as recomputing them per query, and a
model file alone reproduces them. (The authors' code draws a new random input per query; that
fresh noise is independent of membership, so it reveals nothing beyond the class ranking that a
fixed draw reveals.)

Gradients pass through the hook unchanged (straight-through): white-box signals such as input
gradient norms see the trained network, as an attacker holding the weights would.
"""
from __future__ import annotations

import torch
from torch import nn

from crl.core.errors import CRLError
from crl.models.features import classifier_of
from crl.models.transforms import MODEL_TRANSFORMS

HAMP_OUTPUT = "hamp_output"
BUFFER = "hamp_scores"


def rearrange_like(scores: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """`scores` ([C], strictly decreasing) placed so their ranking over the classes follows
    each row of `output` ([..., C]): the class ranked r-th by `output` gets scores[r]. Ties in
    `output` rank the lower class index first, so argmax (first maximum) is kept."""
    order = torch.sort(output, dim=-1, descending=True, stable=True).indices
    placed = torch.empty_like(output)
    placed.scatter_(-1, order, scores.to(output.dtype).expand_as(output).contiguous())
    return placed


def _modify(module: nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the rearranged scores as values, the network's own gradient."""
    modified = rearrange_like(getattr(module, BUFFER), output.detach())
    return modified + (output - output.detach())   # exact values; gradient of `output`


@MODEL_TRANSFORMS.register(HAMP_OUTPUT)
def hamp_output(model: nn.Module) -> nn.Module:
    """`model` answering with HAMP's modified outputs: a `hamp_scores` buffer (one score per
    class, set by `set_reference_scores` or loaded with the weights) and the rearranging hook."""
    if hasattr(model, BUFFER):
        return model
    num_classes = classifier_of(model)[1].out_features
    model.register_buffer(BUFFER, torch.zeros(num_classes))
    model.register_forward_hook(_modify)
    return model


def set_reference_scores(model: nn.Module, logits: torch.Tensor) -> None:
    """Store the random input's `logits` ([C]) as `model`'s HAMP scores: sorted decreasingly and
    made strictly decreasing (a tie is moved down by one float step), so the rearranged output
    has one maximum, at the model's own predicted class."""
    if not hasattr(model, BUFFER):
        raise CRLError("set_reference_scores: the model has no HAMP output transform; apply "
                       f"{HAMP_OUTPUT} first")
    values = torch.sort(logits.detach().float().flatten().cpu(), descending=True).values
    if not torch.isfinite(values).all():
        raise CRLError("HAMP: the random input's logits are not finite; expected a trained "
                       "model with finite outputs")
    for i in range(1, values.numel()):
        if values[i] >= values[i - 1]:
            values[i] = torch.nextafter(values[i - 1], torch.tensor(-float("inf")))
    buffer = getattr(model, BUFFER)
    buffer.copy_(values.to(buffer.device))
