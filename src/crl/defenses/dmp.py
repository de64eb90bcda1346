"""Distillation for Membership Privacy (DMP; Shejwalkar & Houmansadr, AAAI 2021).

DMP trains an unprotected teacher on the private data, labels a disjoint reference set with the
teacher's soft predictions, keeps the reference samples the teacher is most certain about (low
prediction entropy), and trains the released student only on those (sample, soft label) pairs.

Where the reference set comes from here: DMP needs data the teacher never trained on. In this
project's protocol the target pool's non-members are the attack's evaluation set, so they cannot
be used; the reference set is therefore carved out of the MEMBERS: `ref_fraction` of
ctx.train_idx (stratified, from the stream "dmp"/"split") is held out from the teacher, and the
student trains on (a low-entropy subset of) it. The student never sees a hard label, nor any
teacher-part sample. `evaluation_groups()` names the teacher's half ("teacher_only"): samples
the released model never trained on but that shaped it through the teacher.
Cost: the teacher sees only (1 - ref_fraction) of the members, and one extra full training run.
"""
from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import (
    LogsMeans,
    entropy,
    global_rng_from,
    held_out_count,
    held_out_split,
    split_members,
)
from crl.defenses.base import Changes, Defense, Step, TrainContext, only
from crl.training.recipe import Recipe


@DEFENSES.register("dmp")
class DMP(LogsMeans, Defense):
    """Student loss: KL(softmax(teacher(x) / temperature) || softmax(student(x))), x from the
    selected reference samples only (the batch's hard labels are ignored).

    end_epoch() metrics: l_kl, the epoch's mean distillation loss.
    """

    description: ClassVar[str] = ("DMP: distillation for membership privacy on a reference set "
                                  "(Shejwalkar & Houmansadr, AAAI 2021)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("ref_fraction", 0.5, float, low=0.0, high=1.0, low_open=True, high_open=True,
              help="share of the members held out from the teacher as the reference pool"),
        Param("ref_size", None, int, low=1, nullable=True,
              help="keep this many lowest-entropy reference samples (null: all)"),
        Param("temperature", 1.0, float, low=0.0, low_open=True, search=(1.0, 8.0, "log"),
              help="softmax temperature of the teacher's soft labels"),
    )
    batchable: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.teacher: nn.Module | None = None
        self.teacher_idx: torch.Tensor | None = None
        self.ref_pool: torch.Tensor | None = None
        self.ref_idx: torch.Tensor | None = None
        self.ref_entropy: torch.Tensor | None = None   # teacher entropy of each ref_pool sample
        self._report: dict[str, Any] = {}

    def check(self, recipe: Recipe, n_train: int) -> None:
        pool = held_out_count(self.name, "ref_fraction", self.params["ref_fraction"], n_train)
        size = self.params["ref_size"]
        if size is not None and size > pool:
            raise CRLError(f"{self.name}.ref_size = {size}: more than the {pool} reference "
                           f"samples (ref_fraction={self.params['ref_fraction']} of {n_train} "
                           "members); expected at most that many")

    def held_out(self, train_idx: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """The teacher's part of the members (the student never trains on it); with `ref_size`
        the student also drops reference samples the teacher is unsure about, known only after
        the teacher trains."""
        return held_out_split(self.name, "ref_fraction", self.params["ref_fraction"], train_idx,
                              labels, seed)[0]

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """Train the teacher on its part of the members; the student trains on the selected
        reference samples (the one change)."""
        ctx = only(self.name, ctxs)
        self.check(ctx.recipe, int(ctx.train_idx.numel()))
        self.teacher_idx, self.ref_pool = split_members(ctx, self.name, "ref_fraction",
                                                        self.params["ref_fraction"])
        # The unprotected teacher: same architecture, same recipe, plain cross-entropy.
        teacher = ctx.train_submodel(self._fresh_copy(ctx), self.teacher_idx, stream="teacher")
        self.teacher = teacher.eval().requires_grad_(False)
        self.ref_idx = self._select(ctx)
        super().prepare(ctxs)
        return [Changes(train_idx=self.ref_idx)]

    def _fresh_copy(self, ctx: TrainContext) -> nn.Module:
        """A copy of ctx.model re-initialised (each module's reset_parameters, on the CPU) from
        the stream "dmp"/"teacher_init": the teacher depends on the seed only, not on the
        student's weights (which a resumed run overwrites)."""
        model = copy.deepcopy(ctx.model).cpu()
        with global_rng_from(ctx.stream(self.name, "teacher_init")):
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        return model

    def _select(self, ctx: TrainContext) -> torch.Tensor:
        """The `ref_size` reference samples of lowest teacher entropy (DMP's criterion), sorted;
        fills the report."""
        probs = F.softmax(ctx.predict(self.ref_pool, model=self.teacher), dim=1)
        self.ref_entropy = entropy(probs).cpu()
        order = torch.argsort(self.ref_entropy, stable=True)
        size = self.params["ref_size"]
        keep = order if size is None else order[:size]
        _, teacher_acc = ctx.evaluate(self.teacher_idx, model=self.teacher)
        self._report = {
            "n_teacher": int(self.teacher_idx.numel()),
            "n_reference_pool": int(self.ref_pool.numel()),
            "n_student": int(keep.numel()),
            "teacher_train_acc": teacher_acc,
            "selected_mean_entropy": float(self.ref_entropy[keep].mean()),
        }
        return torch.sort(self.ref_pool[keep]).values

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's posteriors at the temperature, for normalised inputs x."""
        if self.teacher is None:
            raise CRLError(f"defense '{self.name}' used before prepare(ctx); call prepare first")
        return F.softmax(self.teacher(x).float() / self.params["temperature"], dim=1)

    def loss(self, ctxs: list[TrainContext], step: Step) -> torch.Tensor:
        only(self.name, ctxs)
        soft = self.soft_labels(step.x[0])
        value = F.kl_div(F.log_softmax(step.logits[0], dim=1), soft, reduction="batchmean")
        self._means().add(l_kl=value)
        return value.reshape(1)

    def report(self) -> dict[str, Any]:
        return dict(self._report)

    def evaluation_groups(self) -> dict[str, np.ndarray]:
        """{"teacher_only": the members the teacher trained on}: the student never trained on
        them (it trains on reference samples only)."""
        if self.teacher_idx is None:
            return {}
        return {"teacher_only": self.teacher_idx.numpy().copy()}

    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None:
            raise CRLError(f"defense '{self.name}': state_dict before prepare(ctx)")
        return {"teacher": self.teacher.state_dict(), "ref_idx": self.ref_idx.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's teacher replaces the one prepare() retrained; the student's set
        (chosen by the retrained teacher) must be the checkpoint's, else training would mix two
        member sets."""
        if self.teacher is None:
            raise CRLError(f"defense '{self.name}': load_state_dict before prepare(ctx)")
        if not torch.equal(state["ref_idx"], self.ref_idx):
            raise CRLError(f"cannot resume {self.name}: the retrained teacher selected other "
                           "reference samples than the checkpoint's; expected a deterministic "
                           "teacher (start a new run without --resume)")
        self.teacher.load_state_dict(state["teacher"])
