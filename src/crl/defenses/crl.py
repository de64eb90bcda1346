"""CRL defenses: `crl` (the full method) and its ablations `imprelaxloss` and `rcl` (Table 2).

All three are one class, `CRLDefense`, with some hyper-parameters fixed per variant:
  crl           every parameter free
  imprelaxloss  lam = 0 (ImpRelaxLoss alone, Eqs. 5-9; no centers, no features needed)
  rcl           tau_rce = tau_rcl = 0 (relaxed center loss without normalisation)
Passing a fixed parameter raises a CRLError. The defaults live in `CRL_DEFAULTS` only.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.losses.crl import CRLLoss, check_crl_params
from crl.losses.relaxloss import BRANCHES
from crl.registry import DEFENSES

# The one place the CRL defaults live: chosen by the search in docs/tuning.md (one setting for
# the digits MLP and the CIFAR-10 cnn).
CRL_DEFAULTS: dict[str, Any] = {
    "alpha_rce": 0.5,
    "alpha_rcl": 14.0,
    "tau_rce": 0.2,
    "tau_rcl": 0.1,
    "lam": 0.1,
    "upper": 1.0,
    "detach_targets": False,
    "center_update": "paper",
}


def _free(fixed: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in CRL_DEFAULTS.items() if k not in fixed}


class BranchMeans:
    """Per-epoch sums of the loss terms (kept on device: no sync per batch) and branch counts."""

    def __init__(self, values: tuple[str, ...], branches: tuple[str, ...]) -> None:
        self.values, self.branches = values, branches
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.branch_counts = {f"{b}_{name}": 0 for b in self.branches for name in BRANCHES}
        self.batches = 0

    def add(self, stats: dict[str, Any]) -> None:
        self.batches += 1
        for key in self.values:
            value = stats.get(key)
            if value is not None:
                self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
                self.counts[key] = self.counts.get(key, 0) + 1
        for b in self.branches:
            taken = stats.get(f"{b}_branch")
            if taken is not None:
                self.branch_counts[f"{b}_{taken}"] += 1

    def means(self) -> dict[str, float]:
        """Means over the batches since the last call, then reset; {} if there were none."""
        if self.batches == 0:
            return {}
        out = {key: float(self.sums[key]) / self.counts[key] for key in self.values
               if key in self.sums}
        for b in self.branches:
            total = sum(self.branch_counts[f"{b}_{name}"] for name in BRANCHES)
            if total:
                for name in BRANCHES:
                    out[f"frac_{b}_{name}"] = self.branch_counts[f"{b}_{name}"] / total
        self.reset()
        return out


@DEFENSES.register("crl")
class CRLDefense(Defense):
    """Center-based Relaxed Learning: L = L_rce + lam * L_rcl (Algorithm 1), centers on the defense.

    extra_metrics(): per-epoch means of l_rce, l_rcl, l_lce, l_ct and the fraction of batches
    in each branch (frac_rce_even/fit/relax, frac_rcl_even/fit/relax); reset on each call.
    """

    name = "crl"
    needs_features = True
    fixed: dict[str, Any] = {}
    defaults = _free(fixed)

    def __init__(self, **params: Any) -> None:
        for key in params:
            if key in self.fixed:
                raise CRLError(f"parameter '{self.name}.{key}' is fixed to {self.fixed[key]!r} "
                               f"for {self.name}; use defense 'crl' to set it")
        super().__init__(**params)
        self.params.update(self.fixed)
        check_crl_params(**self.params)
        self.crl_loss: CRLLoss | None = None
        self.center_optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._means = BranchMeans(("l_rce", "l_rcl", "l_lce", "l_ct"), ("rce", "rcl"))

    def prepare(self, ctx: FitContext) -> None:
        lam = self.params["lam"]
        if lam > 0 and ctx.feat_dim is None:
            raise CRLError(f"{self.name} needs the model's feature size (ctx.feat_dim = None); "
                           "expected a model whose head is an nn.Linear")
        generator = torch.Generator().manual_seed(int(ctx.seed))
        self.crl_loss = CRLLoss(ctx.num_classes, ctx.feat_dim, generator=generator,
                                **self.params).to(ctx.device)
        self.center_optimizer = (self.crl_loss.make_center_optimizer()
                                 if self.crl_loss.centers is not None else None)
        self._means.reset()
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        if self.crl_loss is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        if self.params["lam"] == 0:
            features = None          # the center term is off: features are not needed
        value = self.crl_loss(logits, features, targets, epoch)
        self._means.add(self.crl_loss.last_stats)
        return value

    def optimizers(self) -> list[torch.optim.Optimizer]:
        if self.center_optimizer is None or self.params["lam"] == 0:
            return []
        return [self.center_optimizer]

    def extra_metrics(self) -> dict[str, float]:
        self._last_means = self._means.means()
        return self._last_means

    def end_epoch(self, ctx: FitContext, epoch: int) -> bool:
        """After epoch 1, warn when the center term relaxed on every batch: alpha_rcl is above
        the level L_ct starts at, which can drive the features to zero (docs/tuning.md)."""
        last = getattr(self, "_last_means", {})
        if epoch == 1 and self.params["lam"] > 0 and last.get("frac_rcl_relax") == 1.0:
            warnings.warn(
                f"{self.name}: alpha_rcl={self.params['alpha_rcl']} is above the center loss's "
                f"first-epoch level (l_ct={last.get('l_ct', float('nan')):.3g}), so the center "
                "term relaxes from the start and training may collapse; expected alpha_rcl "
                "below that level", RuntimeWarning, stacklevel=2)
        return False

    def state_dict(self) -> dict[str, Any]:
        if self.crl_loss is None:
            return copy.deepcopy(self._pending_state) if self._pending_state else {}
        centers = self.crl_loss.centers
        return {
            "centers": None if centers is None else centers.detach().clone(),
            "center_optimizer": (None if self.center_optimizer is None
                                 else copy.deepcopy(self.center_optimizer.state_dict())),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.crl_loss is None:            # before prepare(): applied at the end of prepare
            self._pending_state = copy.deepcopy(state)
            return
        centers = self.crl_loss.centers
        saved = state.get("centers")
        if (centers is None) != (saved is None) or (
                centers is not None and tuple(saved.shape) != tuple(centers.shape)):
            want = None if centers is None else tuple(centers.shape)
            got = None if saved is None else tuple(saved.shape)
            raise CRLError(f"checkpoint has {self.name} centers of shape {got}; expected {want}")
        if centers is not None:
            with torch.no_grad():
                centers.copy_(saved.to(centers.device, centers.dtype))
        if self.center_optimizer is not None and state.get("center_optimizer") is not None:
            self.center_optimizer.load_state_dict(state["center_optimizer"])


@DEFENSES.register("imprelaxloss")
class ImpRelaxLossDefense(CRLDefense):
    """Ablation: ImpRelaxLoss alone (Eqs. 5-9), i.e. CRL with lam = 0 (paper Table 2)."""

    name = "imprelaxloss"
    needs_features = False
    fixed = {"lam": 0.0}
    defaults = _free(fixed)


@DEFENSES.register("rcl")
class RelaxedCenterLossDefense(CRLDefense):
    """Ablation: relaxed center loss without normalisation, CRL with tau_rce = tau_rcl = 0."""

    name = "rcl"
    fixed = {"tau_rce": 0.0, "tau_rcl": 0.0}
    defaults = _free(fixed)
