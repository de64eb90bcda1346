"""DP-SGD (Abadi et al. 2016) through Opacus: per-sample clipping + Gaussian noise, RDP accounting.

prepare() makes the model Opacus-compatible (the registered model transform "opacus_fix":
BatchNorm -> GroupNorm, in-place activations off) and returns, as its changes, the model wrapped
in a GradSampleModule, fit's SGD optimizer wrapped in a DPOptimizer, and true Poisson sampling
in place of fit's sampler: every member joins each batch independently with probability
q = batch_size / n_train, ceil(n_train / batch_size) draws an epoch. finish() returns the plain
nn.Module and optimizer.

Variable batch sizes: the GradSampleModule (loss_reduction "mean") undoes the loss's mean over
the actual batch to get per-sample gradients; the DPOptimizer sums their clipped values, adds
noise of std noise_multiplier * max_grad_norm and divides by the EXPECTED batch size
(q * n_train = batch_size), as the Poisson analysis requires. The noise comes from the stream
"dpsgd"/"noise" and is checkpointed with the defense.

Accounting: Opacus's RDP accountant for the Poisson-subsampled Gaussian, with T = every draw
made so far (`batches_drawn`, empty ones included). fit skips an empty draw (no forward pass, no
update), whereas the analysed mechanism would take a pure-noise step there; the two differ only
when some draw is empty, an event of probability at most T * (1 - q) ** (n_train - 1) for the
training set and its neighbours (`empty_batch_bound` in the report; about 1e-14 on the digits
default). `steps` counts the updates actually taken.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.core.seeding import seed_for
from crl.defenses.base import Changes, Defense, EpochEnd, TrainContext, only
from crl.models.transforms import opacus_compatible
from crl.training.recipe import Recipe
from crl.training.sampling import PoissonBatches


def _opacus():
    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError as e:
        raise CRLError("dpsgd needs opacus: pip install 'crl[dp]'") from e
    return GradSampleModule, DPOptimizer


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps by Opacus's RDP accountant
    (inf without noise, 0 without steps)."""
    if steps <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=delta))


@DEFENSES.register("dpsgd")
class DPSGD(Defense):
    """DP-SGD with clipping norm `max_grad_norm` and noise std noise_multiplier * max_grad_norm
    on Poisson batches; report() gives (epsilon, delta) of the RDP accountant."""

    description: ClassVar[str] = ("DP-SGD: per-sample clipping and Gaussian noise, Opacus RDP "
                                  "accounting (Abadi et al., CCS 2016)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("noise_multiplier", 1.0, float, low=0.0, search=(0.3, 3.0, "log"),
              help="noise std / clipping norm"),
        Param("max_grad_norm", 1.0, float, low=0.0, low_open=True,
              help="per-sample gradient clipping norm"),
        Param("delta", 1e-5, float, low=0.0, high=1.0, low_open=True, high_open=True,
              help="delta of the reported (epsilon, delta)"),
    )
    batchable: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.sampler: PoissonBatches | None = None
        self.n_train = 0
        self.steps = 0
        self.batches_drawn = 0
        self.transforms: list[str] = []
        self.noise: torch.Generator | None = None

    def check(self, recipe: Recipe, n_train: int) -> None:
        if recipe.batch_size > n_train:
            raise CRLError(f"{self.name}: batch_size = {recipe.batch_size} with {n_train} "
                           "training samples; expected batch_size <= n_train (the Poisson "
                           "sample rate batch_size / n_train must be at most 1)")

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """Opacus's make_private, by hand: the model wrapped for per-sample gradients, the
        optimizer that clips and adds noise, and the Poisson sampler (the three changes)."""
        GradSampleModule, DPOptimizer = _opacus()
        ctx = only(self.name, ctxs)
        self.check(ctx.recipe, int(ctx.train_idx.numel()))
        model = opacus_compatible(ctx.model).to(ctx.device)
        self.transforms = ["opacus_fix"] if model is not ctx.model else []
        optimizer = ctx.optimizer
        if model is not ctx.model:      # new parameters: a fresh optimizer with the same settings
            optimizer = type(optimizer)(model.parameters(), **optimizer.defaults)
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        self.n_train, self.steps, self.batches_drawn = int(ctx.train_idx.numel()), 0, 0
        batch = ctx.recipe.batch_size
        self.sampler = PoissonBatches(sample_rate=batch / self.n_train,
                                      num_batches=math.ceil(self.n_train / batch))
        self.noise = torch.Generator(device=ctx.device)
        self.noise.manual_seed(seed_for(ctx.seed, self.name, "noise"))
        private = DPOptimizer(
            optimizer, noise_multiplier=self.params["noise_multiplier"],
            max_grad_norm=self.params["max_grad_norm"], expected_batch_size=batch,
            loss_reduction="mean", generator=self.noise)
        private.attach_step_hook(self._count_step)
        return [Changes(model=GradSampleModule(model, loss_reduction="mean"),
                        optimizer=private, sampler=self.sampler)]

    def _count_step(self, optimizer: Any) -> None:
        self.steps += 1

    def end_epoch(self, ctxs: list[TrainContext], epoch: int) -> list[EpochEnd]:
        self.batches_drawn += self.sampler.num_batches   # epsilon is computed once, in report()
        return [EpochEnd()]

    def finish(self, ctx: TrainContext) -> Changes:
        """The plain module and optimizer back (the model's gradients cleared)."""
        GradSampleModule, _ = _opacus()
        model, optimizer = ctx.model, ctx.optimizer
        if isinstance(model, GradSampleModule):
            model = model.to_standard_module()
        if hasattr(optimizer, "original_optimizer"):
            optimizer = optimizer.original_optimizer
        for p in model.parameters():
            p.grad = None
        return Changes(model=model, optimizer=optimizer)

    def epsilon(self, draws: int | None = None) -> float:
        """Epsilon at `delta` after `draws` Poisson draws (default: those made so far)."""
        if self.sampler is None:
            raise CRLError("dpsgd.epsilon() before prepare(ctx): the sample rate is not known yet")
        return rdp_epsilon(self.params["noise_multiplier"], self.sampler.sample_rate,
                           self.batches_drawn if draws is None else int(draws),
                           self.params["delta"])

    def report(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        eps, q = self.epsilon(), self.sampler.sample_rate
        return {
            "epsilon": eps if math.isfinite(eps) else None,   # None: no noise, no guarantee
            "delta": self.params["delta"],
            "noise_multiplier": self.params["noise_multiplier"],
            "max_grad_norm": self.params["max_grad_norm"],
            "sample_rate": q, "batches_drawn": self.batches_drawn, "steps": self.steps,
            "empty_batch_bound": min(1.0, self.batches_drawn * (1 - q) ** (self.n_train - 1)),
            "n_train": self.n_train, "accountant": "rdp", "sampling": "poisson",
            "model_transforms": list(self.transforms),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "batches_drawn": self.batches_drawn,
                "noise": None if self.noise is None else self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.batches_drawn = int(state["batches_drawn"])
        if self.noise is not None and state.get("noise") is not None:
            self.noise.set_state(state["noise"])
