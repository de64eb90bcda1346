"""CRL defenses: `crl` (the full method) and its ablations `imprelaxloss` and `rcl` (Table 2).

All three are one class, `CRLDefense`, with some parameters fixed per variant:
  crl           every parameter free
  imprelaxloss  lam = 0 (ImpRelaxLoss alone, Eqs. 5-9; no centers, no features needed)
  rcl           tau_rce = tau_rcl = 0 (relaxed center loss without normalisation)
A variant's spec is CRL's without its fixed parameters; passing one raises a CRLError. The
defaults (chosen by the search in docs/tuning.md: one setting for the digits MLP and the CIFAR-10
cnn) live in `CRLDefense.spec` only.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import LogsMeans
from crl.defenses.base import Changes, Defense, EpochEnd, Step, TrainContext
from crl.losses.crl import (
    CENTER_UPDATES,
    center_optimizer,
    check_crl_params,
    crl_batched,
    initial_centers,
)
from crl.losses.relaxloss import LossStats


def _weight(name: str, default: float, search: tuple[float, float, str], help: str) -> Param:
    return Param(name, default, float, low=0.0, search=search, help=help)


CRL_SPEC = ParamSpec(
    _weight("alpha_rce", 0.5, (0.1, 1.0, "linear"),
            "relaxation level of the improved relaxed CE (L_lce target)"),
    _weight("alpha_rcl", 14.0, (4.0, 32.0, "log"),
            "relaxation level of the center term; keep it below l_ct's first-epoch level"),
    _weight("tau_rce", 0.2, (0.05, 0.5, "log"), "logit normalisation strength (Eq. 5)"),
    _weight("tau_rcl", 0.1, (0.05, 0.2, "log"), "feature/center normalisation strength"),
    _weight("lam", 0.1, (0.03, 0.5, "log"), "weight of the relaxed center loss"),
    Param("upper", 1.0, float, low=0.0, high=1.0, help="cap on p[y] in the soft target (Eq. 7)"),
    Param("detach_targets", False, bool, help="stop the gradient through the soft target"),
    Param("center_update", "paper", str, choices=CENTER_UPDATES,
          help="paper: SGD lr 0.001 on grad L_rcl; authors: their code's momentum SGD"),
)


@DEFENSES.register("crl")
class CRLDefense(LogsMeans, Defense):
    """Center-based Relaxed Learning: L = L_rce + lam * L_rcl (Algorithm 1), centers on the
    defense (initialised from the stream "centers", trained by their own optimizer).

    end_epoch() metrics: the epoch's means of l_rce, l_rcl, l_lce, l_ct and the share of steps
    in each branch (frac_rce_even/fit/relax, frac_rcl_even/fit/relax).
    """

    description: ClassVar[str] = ("CRL: center-based relaxed learning, relaxed CE plus relaxed "
                                  "center loss (Fang & Kim, UAI 2024)")

    spec: ClassVar[ParamSpec] = CRL_SPEC
    fixed: ClassVar[dict[str, Any]] = {}
    needs_features: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        for key in params or {}:
            if key in self.fixed:
                raise CRLError(f"{self.name}.{key} = {params[key]!r}: fixed to "
                               f"{self.fixed[key]!r} in {self.name}; expected defense 'crl' "
                               "to set it")
        super().__init__(params)
        self.params.update(self.fixed)
        check_crl_params(**self.params, owner=self.name)
        self.centers: nn.Parameter | None = None        # [K, C, D]; None when lam == 0
        self.center_optimizer: torch.optim.Optimizer | None = None

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """Each model's centers drawn from its stream "centers" (lam > 0), stacked [K, C, D],
        with one optimizer of the centers' kind and settings (elementwise: K optimizers)."""
        self.centers = self.center_optimizer = None
        if self.params["lam"] > 0:
            centers = torch.stack([self._initial_centers(ctx) for ctx in ctxs])
            self.centers = nn.Parameter(centers.to(ctxs[0].device))
            self.center_optimizer = center_optimizer(self.centers, self.params["center_update"])
        return super().prepare(ctxs)

    def _initial_centers(self, ctx: TrainContext) -> torch.Tensor:
        if ctx.feat_dim is None:
            raise CRLError(f"{self.name}: ctx.feat_dim = None; expected a model whose head is an "
                           "nn.Linear (the center term needs its input features)")
        return initial_centers(ctx.num_classes, ctx.feat_dim, ctx.stream("centers"))

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        """L = L_rce + lam * L_rcl per model (crl_batched: each model takes its own branch)."""
        means, stats = self._means(), LossStats()
        value = crl_batched(step.logits, step.features, step.y, self.centers, step.epoch,
                            validate=False, stats=stats, **self.params)
        means.add(**{k: stats.get(k) for k in ("l_rce", "l_rcl", "l_lce", "l_ct")})
        means.add_branch("rce", stats.code("rce_branch"))
        means.add_branch("rcl", stats.code("rcl_branch"))
        return value

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self.center_optimizer is None else [self.center_optimizer]

    def end_epoch(self, ctxs: list[TrainContext], epoch: int) -> list[EpochEnd]:
        """Each model's means; after epoch 1, a warning when the center term relaxed on every
        step: alpha_rcl is above the level L_ct starts at, which can drive the features to zero
        (docs/tuning.md)."""
        ends = super().end_epoch(ctxs, epoch)
        for end in ends:
            self._warn_collapse(epoch, end.metrics)
        return ends

    def _warn_collapse(self, epoch: int, means: dict[str, float]) -> None:
        if epoch == 1 and self.params["lam"] > 0 and means.get("frac_rcl_relax") == 1.0:
            warnings.warn(
                f"{self.name}: alpha_rcl={self.params['alpha_rcl']} is above the center loss's "
                f"first-epoch level (l_ct={means.get('l_ct', float('nan')):.3g}), so the center "
                "term relaxes from the start and training may collapse; expected alpha_rcl "
                "below that level", RuntimeWarning, stacklevel=4)

    def state_dict(self) -> dict[str, Any]:
        return {
            "centers": None if self.centers is None else self.centers.detach().clone(),
            "center_optimizer": (None if self.center_optimizer is None
                                 else copy.deepcopy(self.center_optimizer.state_dict())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("centers")
        want = None if self.centers is None else tuple(self.centers.shape)
        got = None if saved is None else tuple(saved.shape)
        if want != got:
            raise CRLError(f"checkpoint has {self.name} centers of shape {got}; expected {want}")
        if self.centers is not None:
            with torch.no_grad():
                self.centers.copy_(saved.to(self.centers.device, self.centers.dtype))
        if self.center_optimizer is not None and state.get("center_optimizer") is not None:
            self.center_optimizer.load_state_dict(state["center_optimizer"])


@DEFENSES.register("imprelaxloss")
class ImpRelaxLossDefense(CRLDefense):
    """Ablation: ImpRelaxLoss alone (Eqs. 5-9), i.e. CRL with lam = 0 (paper Table 2)."""

    description: ClassVar[str] = ("ImpRelaxLoss: CRL without the center loss, an ablation (Fang "
                                  "& Kim, UAI 2024, Table 2)")

    fixed: ClassVar[dict[str, Any]] = {"lam": 0.0}
    spec: ClassVar[ParamSpec] = CRL_SPEC.without(fixed)
    needs_features: ClassVar[bool] = False


@DEFENSES.register("rcl")
class RelaxedCenterLossDefense(CRLDefense):
    """Ablation: relaxed center loss without normalisation, CRL with tau_rce = tau_rcl = 0."""

    description: ClassVar[str] = ("RCL: CRL without normalisation (tau_rce = tau_rcl = 0), an "
                                  "ablation (Fang & Kim, UAI 2024)")

    fixed: ClassVar[dict[str, Any]] = {"tau_rce": 0.0, "tau_rcl": 0.0}
    spec: ClassVar[ParamSpec] = CRL_SPEC.without(fixed)
