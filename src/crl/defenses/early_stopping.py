"""Early stopping: end at a fixed epoch, or by patience on a validation split of the members.

Patience mode holds out `val_fraction` of the MEMBERS (ctx.train_idx) as a validation set, so the
model trains on fewer samples; the target pool's non-members are never touched (they are the
audit's evaluation set). The weights of the best validation epoch are restored at the end.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from crl.defenses._common import check_int, check_number, split_members
from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.registry import DEFENSES

_SALT = 7101   # separates this split's RNG stream from every other seeded draw


@DEFENSES.register("early_stopping")
class EarlyStopping(Defense):
    """Stop at `stop_epoch` (if set), else when the validation loss has not improved for
    `patience` epochs; finish() restores the weights of the best (or the stop) epoch.

    extra_metrics() (patience mode): val_loss and val_acc of each epoch.
    """

    name = "early_stopping"
    defaults: dict[str, Any] = {"stop_epoch": None, "patience": 5, "val_fraction": 0.2}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        p = self.params
        p["stop_epoch"] = check_int(self.name, "stop_epoch", p["stop_epoch"], allow_none=True)
        p["patience"] = check_int(self.name, "patience", p["patience"])
        p["val_fraction"] = check_number(self.name, "val_fraction", p["val_fraction"],
                                         low=0.0, high=1.0, low_open=True, high_open=True)
        self.val_idx: torch.Tensor | None = None
        self._reset()

    def _reset(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.n_train = 0
        self._pending: tuple[float, float] | None = None   # this epoch's validation, if measured
        self._ctx: FitContext | None = None

    @property
    def by_patience(self) -> bool:
        return self.params["stop_epoch"] is None

    def prepare(self, ctx: FitContext) -> None:
        self._reset()
        stop = self.params["stop_epoch"]
        if stop is not None and stop > ctx.epochs:
            raise CRLError(f"{self.name}.stop_epoch={stop} is after the last epoch; "
                           f"expected at most the recipe's {ctx.epochs} epochs")
        if self.by_patience:
            kept, self.val_idx = split_members(
                ctx.train_idx, ctx.y, self.params["val_fraction"],
                seed=ctx.seed, salt=_SALT, owner=self.name, param="val_fraction")
            ctx.train_idx = kept
        self.n_train = int(ctx.train_idx.numel())
        self._ctx = ctx

    @torch.no_grad()
    def validation(self, ctx: FitContext) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) of ctx.model on the validation split, in eval mode."""
        model = ctx.model
        was_training = model.training
        model.eval()
        loss = correct = 0.0
        for start in range(0, self.val_idx.numel(), 512):
            idx = self.val_idx[start:start + 512]
            logits = model(ctx.batch_inputs(idx)).float()
            y = ctx.y[idx].to(logits.device)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
        model.train(was_training)
        n = self.val_idx.numel()
        return loss / n, correct / n

    def _snapshot(self, ctx: FitContext) -> None:
        self.best_state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}

    def end_epoch(self, ctx: FitContext, epoch: int) -> bool:
        if self.stopped_epoch is not None:      # resumed from the checkpoint of the stop epoch
            return True
        if not self.by_patience:
            if epoch >= self.params["stop_epoch"]:
                self.best_epoch = self.stopped_epoch = epoch
                self._snapshot(ctx)
                return True
            return False
        val_loss, val_acc = self._pending or self.validation(ctx)
        self._pending = None
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, epoch, 0
            self._snapshot(ctx)
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.params["patience"]:
            self.stopped_epoch = epoch
            return True
        return False

    def finish(self, ctx: FitContext) -> None:
        if self.best_state is not None:
            ctx.model.load_state_dict(self.best_state)

    def extra_metrics(self) -> dict[str, float]:
        """fit reads this right after each epoch's steps (before end_epoch): the validation is
        measured here so it lands in that epoch's row, and end_epoch reuses it."""
        if not self.by_patience or self._ctx is None or self.val_idx is None:
            return {}
        self._pending = self.validation(self._ctx)
        return {"val_loss": self._pending[0], "val_acc": self._pending[1]}

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
