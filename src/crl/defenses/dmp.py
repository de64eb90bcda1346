"""Distillation for Membership Privacy (DMP; Shejwalkar & Houmansadr, AAAI 2021).

DMP trains an unprotected teacher on the private data, labels a disjoint reference set with the
teacher's soft predictions, keeps the reference samples the teacher is most certain about (low
prediction entropy), and trains the released student only on those (sample, soft label) pairs.

Where the reference set comes from here: DMP needs data the teacher never trained on. In this
project's protocol the target pool's non-members are the attack's evaluation set, so they cannot
be used; the reference set is therefore carved out of the MEMBERS: `ref_fraction` of
ctx.train_idx (stratified) is held out from the teacher, and the student trains on (a
low-entropy subset of) it. The student never sees a hard label, nor any teacher-part sample.
Cost: the teacher sees only (1 - ref_fraction) of the members, and one extra full training run.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crl.defenses._common import Means, check_int, check_number, entropy, split_members
from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.registry import DEFENSES

_SALT = 7301


@DEFENSES.register("dmp")
class DMP(Defense):
    """Student loss: KL(softmax(teacher(x) / temperature) || softmax(student(x))), x from the
    selected reference samples only (the batch's hard labels are ignored).

    extra_metrics(): l_kl, the epoch's mean distillation loss.
    """

    name = "dmp"
    defaults: dict[str, Any] = {"ref_fraction": 0.5, "ref_size": None, "temperature": 1.0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        p["ref_fraction"] = check_number(self.name, "ref_fraction", p["ref_fraction"],
                                         low=0.0, high=1.0, low_open=True, high_open=True)
        p["ref_size"] = check_int(self.name, "ref_size", p["ref_size"], allow_none=True)
        p["temperature"] = check_number(self.name, "temperature", p["temperature"], low=0.0,
                                        low_open=True)
        self.teacher: nn.Module | None = None
        self.teacher_idx: torch.Tensor | None = None
        self.ref_pool: torch.Tensor | None = None
        self.ref_idx: torch.Tensor | None = None
        self.ref_entropy: torch.Tensor | None = None   # teacher entropy of each ref_pool sample
        self._soft: torch.Tensor | None = None
        self._means = Means()
        self._report: dict[str, Any] = {}

    def prepare(self, ctx: FitContext) -> None:
        from crl.data.types import ImageData
        from crl.train import evaluate, fit

        if ctx.recipe is None:
            raise CRLError(f"defense '{self.name}' needs ctx.recipe to train its teacher; "
                           "run it through crl.train.fit")
        self.teacher_idx, self.ref_pool = split_members(
            ctx.train_idx, ctx.y, self.params["ref_fraction"], seed=ctx.seed,
            salt=_SALT, owner=self.name, param="ref_fraction")
        size = self.params["ref_size"]
        if size is not None and size > self.ref_pool.numel():
            raise CRLError(f"{self.name}.ref_size={size} exceeds the {self.ref_pool.numel()} "
                           f"reference samples (ref_fraction={self.params['ref_fraction']} of "
                           f"{ctx.train_idx.numel()} members); expected at most that many")
        # The unprotected teacher: same (still untrained) architecture, same recipe, plain CE.
        data = ImageData(name="dmp-teacher", x=ctx.x, y=ctx.y, num_classes=ctx.num_classes,
                         mean=ctx.mean, std=ctx.std)
        teacher = copy.deepcopy(ctx.model)
        result = fit(teacher, data, self.teacher_idx, ctx.recipe, Defense(), progress=False,
                     desc="dmp teacher")
        self.teacher = result.model.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # Reference selection: lowest teacher prediction entropy first (DMP's criterion).
        with torch.no_grad():
            probs = F.softmax(self._teacher_logits(ctx, self.ref_pool), dim=1)
        self.ref_entropy = entropy(probs).cpu()
        order = torch.argsort(self.ref_entropy, stable=True)
        keep = order if size is None else order[:size]
        self.ref_idx = torch.sort(self.ref_pool[keep]).values
        ctx.train_idx = self.ref_idx
        _, teacher_acc = evaluate(self.teacher, data, self.teacher_idx)
        self._report = {
            "n_teacher": int(self.teacher_idx.numel()),
            "n_reference_pool": int(self.ref_pool.numel()),
            "n_student": int(self.ref_idx.numel()),
            "teacher_train_acc": teacher_acc,
            "selected_mean_entropy": float(self.ref_entropy[keep].mean()),
        }
        self._means = Means()

    @torch.no_grad()
    def _teacher_logits(self, ctx: FitContext, idx: torch.Tensor) -> torch.Tensor:
        out = [self.teacher(ctx.batch_inputs(idx[s:s + 512])).float()
               for s in range(0, idx.numel(), 512)]
        return torch.cat(out)

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's posteriors at the temperature, for normalised inputs x."""
        return F.softmax(self.teacher(x).float() / self.params["temperature"], dim=1)

    def before_step(self, ctx: FitContext, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        if self.teacher is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        self._soft = self.soft_labels(x)

    def loss(self, logits: torch.Tensor, features: torch.Tensor | None, targets: torch.Tensor,
             epoch: int) -> torch.Tensor:
        soft, self._soft = self._soft, None
        if soft is None or soft.shape != logits.shape:
            raise CRLError(f"defense '{self.name}': no soft labels for this batch (loss() must "
                           "follow before_step() on the same batch)")
        value = F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="batchmean")
        self._means.add(l_kl=value.detach())
        return value

    def extra_metrics(self) -> dict[str, float]:
        return self._means.pop()

    def report(self) -> dict[str, Any]:
        return dict(self._report)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.teacher is None else {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
