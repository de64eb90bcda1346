"""K models of one architecture as one module with stacked parameters (the ensemble engine's
two formulations). Both take inputs [K, B, C, H, W] (model k's batch at [k]) and return logits
[K, B, classes] and the penultimate features [K, B, D] (the head's input, for CRL's centers).

    baddbmm  explicit batched layers: a Sequential of Flatten / Linear / ReLU (the `mlp`) runs
             each Linear as one torch.baddbmm over stacked, transposed weights [K, in, out]. No
             per-step functional machinery: for 32 digits MLPs about twice as fast as vmap
             (docs/performance.md).
    vmap     the generic path for any model: torch.func.stack_module_state + functional_call
             + vmap. The head is replaced by nn.Identity to give the features, then applied with
             its own stacked weights (a forward hook cannot capture inside vmap). Buffers are
             stacked per model too, so BatchNorm keeps per-model running statistics (under
             bf16 autocast it normalises a float32 copy of its input, as eager autocast does:
             vmap's batch_norm refuses a bfloat16 input with float32 weights).

Either reproduces K sequential trainings only when one forward is deterministic given the
weights: a model with active dropout (random masks drawn differently under vmap) is trained by
the sequential engine instead. `formulation_for` decides; `blocker` says why not.
"""
from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from crl.core.errors import CRLError
from crl.models.features import classifier_of

FORMULATIONS = ("baddbmm", "vmap")
_BADDBMM_LAYERS = (nn.Flatten, nn.Linear, nn.ReLU, nn.Identity)


class Stack(Protocol):
    formulation: str

    def parameters(self) -> list[torch.Tensor]: ...

    def train(self, mode: bool = True) -> object: ...

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def module(self, k: int) -> nn.Module: ...


def blocker(model: nn.Module) -> str | None:
    """Why no stacked formulation can train `model` exactly like `fit` (None: one can)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"active dropout in layer {name or type(m).__name__}"
    try:
        classifier_of(model)
    except CRLError:
        return "no nn.Linear classifier head"
    if next(model.parameters(), None) is None:
        return "no parameters"
    return None


def baddbmm_fits(model: nn.Module) -> bool:
    """Whether `model` is a Sequential of Flatten(1), Linear and ReLU ending in its head."""
    if not isinstance(model, nn.Sequential) or not len(model) \
            or not all(isinstance(m, _BADDBMM_LAYERS) for m in model):
        return False
    flat = all(m.start_dim == 1 and m.end_dim == -1 for m in model if isinstance(m, nn.Flatten))
    return flat and isinstance(model[-1], nn.Linear) and classifier_of(model)[1] is model[-1]


def formulation_for(model: nn.Module, wanted: str = "best") -> str | None:
    """The formulation that trains `model` ('best': baddbmm where it fits, else vmap; a wanted
    one that does not fit gives vmap), or None for 'sequential' and when neither reproduces
    sequential training (then the sequential engine trains it)."""
    if wanted not in ("best", *FORMULATIONS, "sequential"):
        raise CRLError(f"formulation = {wanted!r}: expected best, {', '.join(FORMULATIONS)} "
                       "or sequential")
    if wanted == "sequential" or blocker(model) is not None:
        return None
    if wanted in ("best", "baddbmm") and baddbmm_fits(model):
        return "baddbmm"
    return "vmap"


def ensemble_note(model: nn.Module) -> str:
    """What the ensemble engine does with `model`, in words for `crl list`."""
    reason = blocker(model)
    if reason is not None:
        return f"sequential: {reason}"
    norms = any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    return formulation_for(model) + (", per-model BatchNorm statistics" if norms else "")


def build_stack(models: list[nn.Module], formulation: str) -> Stack:
    """The K `models` (same architecture, on one device) as one stacked module."""
    return BaddbmmStack(models) if formulation == "baddbmm" else VmapStack(models)


class BaddbmmStack:
    """K Sequential MLPs with each Linear's weights stacked, transposed ([K, in, out], so that
    their gradients need no transposing copy): y = baddbmm(b, x, W^T) per layer."""

    formulation = "baddbmm"

    def __init__(self, models: list[nn.Module]) -> None:
        self.template = copy.deepcopy(models[0])
        self.params: dict[str, nn.Parameter] = {}
        for i, layer in enumerate(self.template):
            if isinstance(layer, nn.Linear):
                self.params[f"{i}.weight"] = _stacked([m[i].weight.t() for m in models])
                if layer.bias is not None:
                    self.params[f"{i}.bias"] = _stacked([m[i].bias[None] for m in models])

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> BaddbmmStack:
        return self                      # no layer behaves differently in training

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [K, B, ...] -> (logits [K, B, classes], head input [K, B, D])."""
        features = x
        for i, layer in enumerate(self.template):
            if isinstance(layer, nn.Flatten):
                x = x.flatten(2)
            elif isinstance(layer, nn.ReLU):
                x = torch.relu(x)
            elif isinstance(layer, nn.Linear):
                features, x = x, self._linear(i, x)
        return x, features

    def _linear(self, i: int, x: torch.Tensor) -> torch.Tensor:
        weight_t, bias = self.params[f"{i}.weight"], self.params.get(f"{i}.bias")
        return torch.bmm(x, weight_t) if bias is None else torch.baddbmm(bias, x, weight_t)

    def module(self, k: int) -> nn.Module:
        """Model k as an ordinary module (a copy of its current weights)."""
        net = copy.deepcopy(self.template)
        with torch.no_grad():
            for name, t in self.params.items():
                net.get_parameter(name).copy_(t[k].t() if name.endswith("weight") else t[k, 0])
        return net


class VmapStack:
    """K copies of any model with stacked parameters and buffers, run with torch.func.vmap."""

    formulation = "vmap"

    def __init__(self, models: list[nn.Module]) -> None:
        head_name, head = classifier_of(models[0])
        self.template = copy.deepcopy(models[0])
        self.trunk = copy.deepcopy(models[0]).to("meta")
        _replace(self.trunk, head_name, nn.Identity())
        for m in self.trunk.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _normalise_in_float32(m)
        params, self.buffers = stack_module_state(models)
        self.params = {k: nn.Parameter(v) for k, v in params.items()}
        self.head = (f"{head_name}.weight", f"{head_name}.bias" if head.bias is not None else None)
        self.trunk_keys = [k for k in self.params if not k.startswith(head_name + ".")]

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> VmapStack:
        self.trunk.train(mode)
        return self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [K, B, ...] -> (logits [K, B, classes], features [K, B, D])."""
        trunk = {k: self.params[k] for k in self.trunk_keys}
        weight, bias = (None if k is None else self.params[k] for k in self.head)
        return vmap(self._one, randomness="error")(trunk, self.buffers, weight, bias, x)

    def _one(self, trunk, buffers, weight, bias, x) -> tuple[torch.Tensor, torch.Tensor]:
        features = functional_call(self.trunk, (trunk, buffers), (x,))
        return F.linear(features, weight, bias), features

    def module(self, k: int) -> nn.Module:
        """Model k as an ordinary module (a copy of its current weights and buffers)."""
        return _unstacked(self.template, self.params, self.buffers, k)


def agrees(stack: Stack, models: list[nn.Module], probe: torch.Tensor) -> bool:
    """Whether the stack's logits on `probe` [B, C, H, W] equal each model's own (eval mode):
    a foreign model whose head is not its last operation fails this."""
    stack.train(False)
    try:
        with torch.no_grad():
            got, _ = stack(probe.unsqueeze(0).expand(len(models), *probe.shape))
            want = torch.stack([m.eval()(probe) for m in models])
    finally:
        stack.train(True)
        for m in models:
            m.train()
    return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))


def trial_step(models: list[nn.Module], formulation: str, probe: torch.Tensor,
               bf16: bool) -> str | None:
    """One training-mode forward and backward of a throwaway stack of `models` on `probe`
    [B, C, H, W], under the recipe's autocast: None when it runs, else the first line of the
    error (vmap refuses some operations only in training, e.g. a memory-format query that
    CUDA's batch norm makes). Neither the models nor any stack in use are changed."""
    stack = build_stack(models, formulation)
    try:
        with torch.autocast(device_type=probe.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, _ = stack.train(True)(probe.unsqueeze(0).expand(len(models), *probe.shape))
        logits.float().sum().backward()
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def _unstacked(template: nn.Module, params: dict[str, torch.Tensor],
               buffers: dict[str, torch.Tensor], k: int) -> nn.Module:
    net = copy.deepcopy(template)
    with torch.no_grad():
        for name, t in params.items():
            net.get_parameter(name).copy_(t[k])
        for name, t in buffers.items():
            net.get_buffer(name).copy_(t[k])
    return net


def _normalise_in_float32(norm: nn.Module) -> None:
    """BatchNorm on a float32 copy of its input, cast back (what eager autocast computes): under
    vmap, batch_norm refuses a bfloat16 input with float32 weights."""
    forward = norm.forward

    def float32_forward(x: torch.Tensor) -> torch.Tensor:
        return forward(x.float()).to(x.dtype)

    norm.forward = float32_forward


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _stacked(tensors: list[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())
