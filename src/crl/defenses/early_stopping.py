"""Early stopping: end at a fixed epoch, or by patience on a validation split of the members.

Patience mode holds out `val_fraction` of the MEMBERS (ctx.train_idx, stratified, drawn from the
stream "early_stopping"/"split") as a validation set, so the model trains on fewer samples; the
target pool's non-members are never touched (they are the audit's evaluation set). The weights
of the best validation epoch are restored at the end.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from crl.core.errors import CRLError
from crl.core.params import Param, ParamSpec
from crl.core.registry import DEFENSES
from crl.defenses._common import held_out_count, held_out_split, split_members
from crl.defenses.base import Changes, Defense, EpochEnd, TrainContext, only
from crl.training.recipe import Recipe


@DEFENSES.register("early_stopping")
class EarlyStopping(Defense):
    """Stop at `stop_epoch` (if set), else when the validation loss has not improved for
    `patience` epochs; finish() restores the weights of the best (or the stop) epoch.

    end_epoch() metrics (patience mode): val_loss and val_acc of that epoch.
    """

    description: ClassVar[str] = ("early stopping at a fixed epoch or on validation loss (Song "
                                  "& Mittal, USENIX Security 2021)")

    spec: ClassVar[ParamSpec] = ParamSpec(
        Param("stop_epoch", None, int, low=1, nullable=True,
              help="stop after this epoch (null: stop by patience)"),
        Param("patience", 5, int, low=1,
              help="epochs without a lower validation loss before stopping"),
        Param("val_fraction", 0.2, float, low=0.0, high=1.0, low_open=True, high_open=True,
              help="share of the members held out for validation (patience mode)"),
    )
    batchable: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        self.val_idx: torch.Tensor | None = None
        self.n_train = 0
        self._reset()

    def _reset(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    @property
    def by_patience(self) -> bool:
        return self.params["stop_epoch"] is None

    def check(self, recipe: Recipe, n_train: int) -> None:
        stop = self.params["stop_epoch"]
        if stop is not None and stop > recipe.epochs:
            raise CRLError(f"{self.name}.stop_epoch = {stop}: after the last epoch; expected at "
                           f"most the recipe's {recipe.epochs} epochs")
        if self.by_patience:
            held_out_count(self.name, "val_fraction", self.params["val_fraction"], n_train)

    def held_out(self, train_idx: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
        """Patience mode: the validation split of the members; stop_epoch mode: none."""
        if not self.by_patience:
            return np.zeros(0, np.int64)
        return held_out_split(self.name, "val_fraction", self.params["val_fraction"], train_idx,
                              labels, seed)[1]

    def prepare(self, ctxs: list[TrainContext]) -> list[Changes]:
        """Patience mode: the validation split held out of the members (the one change)."""
        ctx = only(self.name, ctxs)
        self._reset()
        train_idx = ctx.train_idx
        if self.by_patience:
            train_idx, self.val_idx = split_members(ctx, self.name, "val_fraction",
                                                    self.params["val_fraction"])
        self.n_train = int(train_idx.numel())
        return [Changes(train_idx=train_idx if self.by_patience else None)]

    def _snapshot(self, ctx: TrainContext) -> None:
        self.best_state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    def end_epoch(self, ctxs: list[TrainContext], epoch: int) -> list[EpochEnd]:
        ctx = only(self.name, ctxs)
        if not self.by_patience:
            if epoch >= self.params["stop_epoch"]:
                self.best_epoch = self.stopped_epoch = epoch
                self._snapshot(ctx)
            return [EpochEnd(stop=self.stopped_epoch is not None)]
        val_loss, val_acc = ctx.evaluate(self.val_idx)
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self._snapshot(ctx)
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.params["patience"]:
            self.stopped_epoch = epoch
        return [EpochEnd(metrics={"val_loss": val_loss, "val_acc": val_acc},
                         stop=self.stopped_epoch is not None)]

    def finish(self, ctx: TrainContext) -> Changes:
        """The best (or the stop) epoch's weights restored into the model."""
        if self.best_state is not None:
            ctx.model.load_state_dict(self.best_state)
        return Changes()

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": "patience" if self.by_patience else "stop_epoch",
                               "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
                               "n_train": self.n_train}
        if self.by_patience:
            out["n_val"] = int(self.val_idx.numel()) if self.val_idx is not None else 0
            out["best_val_loss"] = self.best_loss if self.best_epoch else None
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "stopped_epoch": self.stopped_epoch,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = state["best_loss"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = state["bad_epochs"]
        self.stopped_epoch = state["stopped_epoch"]
        self.best_state = state["best_state"]
