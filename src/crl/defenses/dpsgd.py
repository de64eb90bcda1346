"""DP-SGD (Abadi et al. 2016) through Opacus: per-sample clipping + Gaussian noise, RDP accounting.

prepare() makes the model Opacus-compatible (BatchNorm -> GroupNorm via ModuleValidator.fix, and
in-place activations switched off, which Opacus's backward hooks forbid), wraps it in a
GradSampleModule and fit's SGD optimizer in a DPOptimizer; finish() unwraps it back to the plain
nn.Module, so saved state_dict keys carry no `_module.` prefix.

Accounting caveat: fit draws shuffled fixed-size batches, not the Poisson subsampling the RDP
analysis assumes; epsilon (RDP accountant, sample rate = batch_size / n_train) is the usual
approximation, not a proven guarantee for this sampler.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from torch import nn

from crl.defenses._common import check_number
from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.registry import DEFENSES

SAMPLING_NOTE = ("shuffled fixed-size batches (not Poisson): epsilon is the usual approximation")


def _opacus():
    try:
        import opacus  # noqa: F401
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator
    except ImportError as e:
        raise CRLError("dpsgd needs opacus: pip install 'crl[dp]'") from e
    return GradSampleModule, DPOptimizer, ModuleValidator


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` subsampled Gaussian steps by Opacus's RDP accountant (inf if no noise)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


def opacus_compatible(model: nn.Module) -> nn.Module:
    """`model` made acceptable to Opacus: BatchNorm -> GroupNorm etc. (a new module when anything
    had to change) and in-place activations switched off (Opacus's hooks forbid them)."""
    _, _, ModuleValidator = _opacus()
    if ModuleValidator.validate(model, strict=False):
        fixed = ModuleValidator.fix(model)
        errors = ModuleValidator.validate(fixed, strict=False)
        if errors:
            raise CRLError(f"dpsgd cannot make {type(model).__name__} Opacus-compatible: "
                           f"{str(errors[0]).splitlines()[0]}")
        model = fixed
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return model


@DEFENSES.register("dpsgd")
class DPSGD(Defense):
    """DP-SGD with clipping norm `max_grad_norm`, noise std noise_multiplier * max_grad_norm,
    averaged over the expected batch size; report() gives (epsilon, delta)."""

    name = "dpsgd"
    defaults: dict[str, Any] = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        p["noise_multiplier"] = check_number(self.name, "noise_multiplier",
                                             p["noise_multiplier"], low=0.0)
        p["max_grad_norm"] = check_number(self.name, "max_grad_norm", p["max_grad_norm"],
                                          low=0.0, low_open=True)
        p["delta"] = check_number(self.name, "delta", p["delta"], low=0.0, high=1.0,
                                  low_open=True, high_open=True)
        self.steps = 0
        self.sample_rate: float | None = None
        self.n_train = 0
        self.replaced_modules = False

    def prepare(self, ctx: FitContext) -> None:
        GradSampleModule, DPOptimizer, _ = _opacus()
        model = opacus_compatible(ctx.model)
        self.replaced_modules = model is not ctx.model
        model = model.to(ctx.device)
        optimizer = ctx.optimizer
        if model is not ctx.model:      # new parameters: a fresh optimizer with the same settings
            optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        wrapped = GradSampleModule(model, loss_reduction="mean")
        ctx.model = wrapped
        ctx.optimizer = DPOptimizer(
            optimizer, noise_multiplier=self.params["noise_multiplier"],
            max_grad_norm=self.params["max_grad_norm"], expected_batch_size=ctx.batch_size,
            loss_reduction="mean",
        )
        self.n_train = int(ctx.train_idx.numel())
        self.sample_rate = min(1.0, ctx.batch_size / self.n_train)
        self.steps = 0

    def after_step(self, ctx: FitContext, epoch: int) -> None:
        self.steps += 1

    def finish(self, ctx: FitContext) -> None:
        GradSampleModule, _, _ = _opacus()
        if isinstance(ctx.model, GradSampleModule):
            ctx.model = ctx.model.to_standard_module()
        if hasattr(ctx.optimizer, "original_optimizer"):
            ctx.optimizer = ctx.optimizer.original_optimizer
        for p in ctx.model.parameters():
            p.grad = None

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon at `delta` after `steps` optimizer steps (default: the steps taken so far)."""
        if self.sample_rate is None:
            raise CRLError("dpsgd.epsilon() before prepare(ctx): the sample rate is not known yet")
        return rdp_epsilon(self.params["noise_multiplier"], self.sample_rate,
                           self.steps if steps is None else int(steps), self.params["delta"])

    def report(self) -> dict[str, Any]:
        if self.sample_rate is None:
            return {}
        eps = self.epsilon()
        return {
            "epsilon": eps if math.isfinite(eps) else None,   # None: no noise, no guarantee
            "delta": self.params["delta"],
            "noise_multiplier": self.params["noise_multiplier"],
            "max_grad_norm": self.params["max_grad_norm"],
            "sample_rate": self.sample_rate, "steps": self.steps, "n_train": self.n_train,
            "accountant": "rdp", "sampling": SAMPLING_NOTE,
            "opacus_fixed_modules": self.replaced_modules,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
