"""The one training loop every defense plugs into: `train_epoch` trains K >= 1 models (a
`ModelGroup`) for one epoch; `fit` drives it for one model, with checkpoints and bitwise resume,
and the ensemble engine (crl.engine.ensemble) for K stacked models.

A model trains on data[train_idx] with a `Recipe` and a `Defense` (crl.defenses.base: the only
defense module this loop knows). Every epoch appends to run_dir/metrics.jsonl and writes an
atomic, checksummed run_dir/checkpoint.pt; `resume=True` continues from it and ends with exactly
the weights an uninterrupted run gives. The checkpoint's fingerprint covers the recipe, the
defense and its parameters, the dataset's identity, the exact training indices, the
architecture and the arithmetic (the device class: a checkpoint written on a GPU is not resumed
on a CPU), so a checkpoint is never resumed into another run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from crl.core.errors import CRLError
from crl.core.integrity import load_verified, save_verified
from crl.core.seeding import seed_for, torch_generator
from crl.core.utils import resolve_device, write_text_atomic
from crl.data.augment import augment_batch
from crl.data.types import ImageData, normalize
from crl.defenses.base import Defense, EpochEnd, Step, SubTrainer, TrainContext, default_sampler
from crl.engine.protocol import arithmetic_label
from crl.models.evaluation import evaluate, predict_logits
from crl.models.features import FeatureTap, classifier_of
from crl.training.fingerprints import architecture_digest, data_identity, indices_digest
from crl.training.recipe import Recipe

CHECKPOINT_FORMAT = "crl-checkpoint-3"   # 3: a defense's per-model state has a model axis


@dataclass
class FitResult:
    model: nn.Module
    defense: Defense
    history: list[dict[str, float]] = field(default_factory=list)
    train_idx: np.ndarray | None = None   # exactly what the model trained on (after prepare)
    report: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # defense.evaluation_groups()


def lr_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe
                ) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's multistep schedule: lr times gamma per milestone passed (stepped per epoch)."""
    milestones, gamma = recipe.milestones, recipe.gamma

    def factor(epoch_done: int) -> float:
        return gamma ** sum(1 for m in milestones if epoch_done >= m)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _fingerprint(model, data, train_idx, recipe: Recipe, defense: Defense) -> dict:
    return json.loads(json.dumps({
        "recipe": recipe.weights_key(), "defense": defense.name, "params": defense.params,
        "data": data_identity(data), "train": indices_digest(train_idx),
        "architecture": architecture_digest(model),
        "arithmetic": arithmetic_label("sequential", recipe)}, default=str))


def _submodel_trainer(data: ImageData, recipe: Recipe):
    def train(model: nn.Module, idx, *, defense: Defense | None = None,
              stream: str = "submodel") -> nn.Module:
        sub = replace(recipe, seed=seed_for(recipe.seed, stream))
        return fit(model, data, idx, sub, defense, progress=False, desc=stream).model

    return train


def training_indices(idx) -> torch.Tensor:
    """Dataset indices as a long tensor; CRLError when there are none."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    if idx.numel() == 0:
        raise CRLError("train_idx is empty: expected at least one training sample")
    return idx


def train_context(data: ImageData, recipe: Recipe, model: nn.Module,
                  optimizer: torch.optim.Optimizer, train_idx, defense: Defense, *,
                  trainer: SubTrainer | None = None) -> TrainContext:
    """A model's context before the defense's changes (every engine builds it here): its
    recipe (own seed), model and optimizer on the recipe's device, training indices, the
    width of its features if the defense needs them, the default sampler."""
    feat_dim = classifier_of(model)[1].in_features if defense.needs_features else None
    return TrainContext(data=data, recipe=recipe, model=model, optimizer=optimizer,
                        train_idx=training_indices(train_idx),
                        device=resolve_device(recipe.device), feat_dim=feat_dim,
                        sampler=default_sampler(recipe), trainer=trainer)


def _context(model, data, train_idx, recipe, defense) -> TrainContext:
    model = model.to(resolve_device(recipe.device))
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    return train_context(data, recipe, model, optimizer, train_idx, defense,
                         trainer=_submodel_trainer(data, recipe))


def fit(model: nn.Module, data: ImageData, train_idx, recipe: Recipe,
        defense: Defense | None = None, *, eval_idx=None, run_dir: str | Path | None = None,
        resume: bool = False, progress: bool = True, desc: str = "train") -> FitResult:
    """Train `model` on data[train_idx] with `defense` (default: plain cross-entropy).

    Returns the trained model (on the recipe's device), its per-epoch history and exactly the
    indices it trained on (a defense may hold some out)."""
    defense = defense or Defense()
    train_idx = training_indices(train_idx)
    defense.check(recipe, int(train_idx.numel()))
    fingerprint = _fingerprint(model, data, train_idx, recipe, defense)
    ctx = _context(model, data, train_idx, recipe, defense)
    ctx = ctx.with_changes(defense.prepare([ctx])[0])
    group = OneModel([ctx], defense, ctx.optimizer, [""])
    scheduler = lr_schedule(ctx.optimizer, recipe)
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    history: list[dict[str, float]] = []
    start = 1
    if resume and ckpt is not None and ckpt.exists():
        history, start = _restore(ckpt, fingerprint, group, scheduler)
    try:
        bar = tqdm(range(start, recipe.epochs + 1), desc=desc, disable=not progress,
                   leave=False, initial=start - 1, total=recipe.epochs, dynamic_ncols=True)
        for epoch in bar:
            (row,), (end,) = train_epoch(group, epoch, [eval_idx])
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}")
            scheduler.step()
            if run_dir is not None:
                write_metrics(Path(run_dir) / "metrics.jsonl", history)
                _save_checkpoint(ckpt, fingerprint, epoch, end.stop, group, scheduler, history)
            if end.stop:
                break
        ctx = ctx.with_changes(defense.finish(ctx))
        check_diverged(ctx.model, data, ctx.train_idx, len(history), defense.name,
                       "" if desc == "train" else desc)
    finally:
        group.close()
    return FitResult(model=ctx.model, defense=defense, history=history,
                     train_idx=ctx.train_idx.numpy().copy(), report=defense.report(),
                     groups=defense.evaluation_groups())


def check_diverged(model: nn.Module, data: ImageData, train_idx, epoch: int, defense: str,
                   label: str = "") -> None:
    """CRLError naming the model when training ended with NaN or infinite weights, or logits
    on (up to 256 of) its training samples: the last step diverged after a finite loss, so no
    later loss showed it, and the attacks would only see non-finite logits."""
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    what = "weights"
    if not bad:
        idx = np.array(np.asarray(train_idx)[:256])   # a writable copy (Ray's are not)
        bad, what = int((~torch.isfinite(predict_logits(model, data, idx))).sum()), "logits"
    if bad:
        who = f" of model {label}" if label else ""
        raise CRLError(f"training diverged{who}: {bad} {what} are NaN or infinite after epoch "
                       f"{epoch} (defense '{defense}'); expected finite values: lower --lr")


class ModelGroup:
    """K >= 1 models of one recipe and defense that `train_epoch` trains together: their
    contexts (own seed, indices, sampler; model k's streams "shuffle" and "augment"), the
    optimizer of their weights, and names for messages. A subclass says how the K models
    compute (`forward`: inputs [K, B, ...] -> logits [K, B, C] and features [K, B, D] or None)
    and what model k is as a module (`module`): fit's one model (`OneModel`) or the ensemble's
    stack."""

    def __init__(self, contexts: list[TrainContext], defense: Defense,
                 optimizer: torch.optim.Optimizer, names: list[str]) -> None:
        self.contexts, self.defense, self.optimizer, self.names = (
            contexts, defense, optimizer, names)
        self.recipe, self.data, self.device = (
            contexts[0].recipe, contexts[0].data, contexts[0].device)
        self.shuffles = [torch_generator(ctx.seed, "shuffle") for ctx in contexts]
        self.augments = [torch_generator(ctx.seed, "augment") for ctx in contexts]
        self.images, self.labels = self.data.x.to(self.device), self.data.y.to(self.device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def module(self, k: int) -> nn.Module:
        raise NotImplementedError

    def train_mode(self) -> None:
        for k in range(len(self.contexts)):
            self.module(k).train()

    def inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model k's batch at [k]: normalised (and augmented by its own stream) inputs
        [K, B, C, H, W] and labels [K, B], on the device."""
        models, batch = idx.shape
        flat = idx.reshape(-1).to(self.device)
        x = normalize(self.images[flat], self.data.mean, self.data.std)
        if self.recipe.augment:
            x = torch.cat([augment_batch(part, gen)
                           for part, gen in zip(x.split(batch), self.augments)])
        return x.view(models, batch, *x.shape[1:]), self.labels[flat].view(models, batch)


class OneModel(ModelGroup):
    """fit's group: one model (K = 1), its penultimate features tapped if the defense needs
    them; `close()` removes the tap."""

    def __init__(self, contexts: list[TrainContext], defense: Defense,
                 optimizer: torch.optim.Optimizer, names: list[str]) -> None:
        super().__init__(contexts, defense, optimizer, names)
        self.model = contexts[0].model
        self.tap = FeatureTap(self.model) if defense.needs_features else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x[0]
        if self.recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        features = self.tap.pop() if self.tap is not None else None
        return logits.unsqueeze(0), None if features is None else features.unsqueeze(0)

    def module(self, k: int) -> nn.Module:
        return self.model

    def generators(self) -> dict[str, torch.Generator]:
        return {"shuffle": self.shuffles[0], "augment": self.augments[0]}

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def train_epoch(group: ModelGroup, epoch: int, eval_idx: list
                ) -> tuple[list[dict[str, float]], list[EpochEnd]]:
    """One epoch of K models: every step, then the defense's end of epoch and monitoring on
    eval_idx[k]. One history row per model (epoch, train_loss, train_acc, the defense's
    metrics, test_loss/test_acc, lr) and the defense's EpochEnd per model."""
    group.train_mode()
    opts = [group.optimizer, *group.defense.optimizers()]
    loss_sum = correct = 0
    seen = 0
    streams = [ctx.sampler.batches(ctx.train_idx, gen)
               for ctx, gen in zip(group.contexts, group.shuffles)]
    for step, parts in enumerate(zip(*streams), start=1):
        idx = torch.stack(parts)                                       # [K, B]
        if idx.numel() == 0:      # possible under Poisson sampling: nothing to learn from
            continue
        losses, hits = train_step(group, idx, epoch, step, opts)
        loss_sum = loss_sum + losses.double() * idx.shape[1]
        correct = correct + hits.double()
        seen += idx.shape[1]
    ends = group.defense.end_epoch(group.contexts, epoch)
    if len(ends) > 1 and any(end.stop for end in ends):
        raise CRLError(f"defense '{group.defense.name}' stopped a model early while training "
                       f"{len(ends)} models at once; expected batchable = False for a defense "
                       "that stops early")
    rows = []
    for k, end in enumerate(ends):
        row = {"epoch": epoch, "train_loss": _share(loss_sum, k, seen),
               "train_acc": _share(correct, k, seen)}
        row.update({key: float(v) for key, v in end.metrics.items()})
        rows.append({**row, **_monitor(group, k, eval_idx[k]),
                     "lr": group.optimizer.param_groups[0]["lr"]})
    return rows, ends


def _share(total, k: int, seen: int) -> float:
    return float(total[k]) / max(seen, 1) if isinstance(total, torch.Tensor) else 0.0


def _monitor(group: ModelGroup, k: int, eval_idx) -> dict[str, float]:
    """test_loss / test_acc of model k on eval_idx (monitoring only: the training precision;
    attacks use fp32 logits)."""
    if eval_idx is None or not len(eval_idx):
        return {}
    loss, acc = evaluate(group.module(k), group.data, eval_idx,
                         batch_size=max(group.recipe.batch_size, 256), bf16=group.recipe.bf16)
    return {"test_loss": loss, "test_acc": acc}


def train_step(group: ModelGroup, idx: torch.Tensor, epoch: int, step: int,
               opts: list[torch.optim.Optimizer]) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step of every model of the group on its batch idx[k]: (losses [K],
    correct predictions [K]). The sum of the losses is backpropagated (model k's gradient is
    its own loss's), then every optimizer steps."""
    x, y = group.inputs(idx)
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=group.device.type, dtype=torch.bfloat16,
                        enabled=group.recipe.bf16):
        logits, features = group.forward(x)
    needs = group.defense.needs_features and features is not None
    s = Step(x=x, y=y, idx=idx, logits=logits.float(), features=features.float() if needs
             else None, epoch=epoch, step=step)
    losses = group.defense.loss(group.contexts, s)
    if tuple(losses.shape) != (len(group.contexts),):
        raise CRLError(f"defense '{group.defense.name}' returned a loss of shape "
                       f"{tuple(losses.shape)}; expected one loss per model, "
                       f"[{len(group.contexts)}]")
    if not bool(torch.isfinite(losses).all()):
        k = int((~torch.isfinite(losses)).nonzero()[0])
        who = f" of model {group.names[k]}" if group.names[k] else ""
        raise CRLError(f"training loss = {losses[k].item()} at epoch {epoch}, step {step}{who} "
                       f"(defense '{group.defense.name}'): expected a finite value; lower --lr "
                       "or check the data")
    losses.sum().backward()
    for opt in opts:
        opt.step()
    return losses.detach(), (s.logits.detach().argmax(-1) == y).sum(-1)


def _save_checkpoint(path, fingerprint, epoch, stopped, group: OneModel, scheduler,
                     history) -> None:
    save_verified(path, {
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
        "stopped": bool(stopped),
        "model": group.model.state_dict(), "optimizer": group.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "defense": group.defense.state_dict(),
        "generators": {k: g.get_state() for k, g in group.generators().items()},
        "torch_rng": torch.get_rng_state(), "history": history,
    })


def _restore(path, fingerprint, group: OneModel, scheduler) -> tuple[list, int]:
    state = load_verified(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CRLError(f"checkpoint {path} is not a crl checkpoint of this version (expected "
                       f"format {CHECKPOINT_FORMAT})")
    if state["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise CRLError(f"cannot resume from {path}: it was written for another "
                       f"{', '.join(diff)}; expected the same run (start a new --out or drop "
                       "--resume)")
    group.model.load_state_dict(state["model"])
    group.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    group.defense.load_state_dict(state["defense"])
    for k, g in group.generators().items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch_rng"])
    done = group.recipe.epochs if state["stopped"] else int(state["epoch"])
    return list(state["history"]), done + 1


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch metrics as JSON lines (atomic)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))
