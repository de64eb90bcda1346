"""`fit`: the one training loop every defense plugs into, with checkpoints and bitwise resume.

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

from crl.data.augment import augment_batch
from crl.data.types import ImageData
from crl.defenses.base import Defense, EpochEnd, Step, TrainContext, default_sampler
from crl.engine.protocol import arithmetic_label
from crl.errors import CRLError
from crl.evaluation import evaluate, predict_logits
from crl.fingerprints import architecture_digest, data_identity, indices_digest
from crl.integrity import load_verified, save_verified
from crl.models.features import FeatureTap, classifier_of
from crl.recipe import Recipe
from crl.seeding import seed_for, torch_generator
from crl.utils import resolve_device, write_text_atomic

CHECKPOINT_FORMAT = "crl-checkpoint-2"


@dataclass
class FitResult:
    model: nn.Module
    defense: Defense
    history: list[dict[str, float]] = field(default_factory=list)
    train_idx: np.ndarray | None = None   # exactly what the model trained on (after prepare)
    report: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # defense.evaluation_groups()


def lr_lambda(milestones: tuple[int, ...], gamma: float):
    def f(epoch_done: int) -> float:
        return gamma ** sum(1 for m in milestones if epoch_done >= m)

    return f


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


def _context(model, data, train_idx, recipe, defense) -> TrainContext:
    device = resolve_device(recipe.device)
    model = model.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    feat_dim = classifier_of(model)[1].in_features if defense.needs_features else None
    return TrainContext(data=data, recipe=recipe, model=model, optimizer=optimizer,
                        train_idx=train_idx, device=device, feat_dim=feat_dim,
                        sampler=default_sampler(recipe),
                        trainer=_submodel_trainer(data, recipe))


def fit(model: nn.Module, data: ImageData, train_idx, recipe: Recipe,
        defense: Defense | None = None, *, eval_idx=None, run_dir: str | Path | None = None,
        resume: bool = False, progress: bool = True, desc: str = "train") -> FitResult:
    """Train `model` on data[train_idx] with `defense` (default: plain cross-entropy).

    Returns the trained model (on the recipe's device), its per-epoch history and exactly the
    indices it trained on (a defense may hold some out)."""
    defense = defense or Defense()
    train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
    if train_idx.numel() == 0:
        raise CRLError("train_idx is empty: expected at least one training sample")
    defense.check(recipe, int(train_idx.numel()))
    fingerprint = _fingerprint(model, data, train_idx, recipe, defense)
    ctx = _context(model, data, train_idx, recipe, defense)
    defense.prepare(ctx)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        ctx.optimizer, lr_lambda(recipe.milestones, recipe.gamma))
    gens = {"shuffle": torch_generator(recipe.seed, "shuffle"),
            "augment": torch_generator(recipe.seed, "augment")}
    ckpt = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    history: list[dict[str, float]] = []
    start = 1
    if resume and ckpt is not None and ckpt.exists():
        history, start = _restore(ckpt, fingerprint, ctx, defense, scheduler, gens)
    tap = FeatureTap(ctx.model) if defense.needs_features else None
    try:
        bar = tqdm(range(start, recipe.epochs + 1), desc=desc, disable=not progress,
                   leave=False, initial=start - 1, total=recipe.epochs, dynamic_ncols=True)
        for epoch in bar:
            row, end = _epoch(ctx, defense, tap, gens, epoch, eval_idx)
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}")
            scheduler.step()
            if run_dir is not None:
                write_metrics(Path(run_dir) / "metrics.jsonl", history)
                _save_checkpoint(ckpt, fingerprint, epoch, end.stop, ctx, defense, scheduler,
                                 gens, history)
            if end.stop:
                break
        defense.finish(ctx)
        check_diverged(ctx.model, data, ctx.train_idx, len(history), defense.name,
                       "" if desc == "train" else desc)
    finally:
        if tap is not None:
            tap.remove()
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


def _epoch(ctx, defense, tap, gens, epoch, eval_idx) -> tuple[dict[str, float], EpochEnd]:
    row = _train_one_epoch(ctx, defense, tap, gens, epoch)
    end = defense.end_epoch(ctx, epoch)
    row.update({k: float(v) for k, v in end.metrics.items()})
    if eval_idx is not None and len(eval_idx):
        # monitoring only: same precision as training (attacks use fp32 logits)
        row["test_loss"], row["test_acc"] = evaluate(
            ctx.model, ctx.data, eval_idx, batch_size=max(ctx.recipe.batch_size, 256),
            bf16=ctx.recipe.bf16)
    row["lr"] = ctx.optimizer.param_groups[0]["lr"]
    return row, end


def _batch_inputs(ctx: TrainContext, idx: torch.Tensor, gen: torch.Generator):
    x = ctx.inputs(idx)
    if ctx.recipe.augment:
        x = augment_batch(x, gen)
    if ctx.recipe.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, ctx.data.y[idx].to(ctx.device)


def _train_one_epoch(ctx: TrainContext, defense: Defense, tap: FeatureTap | None,
                     gens: dict[str, torch.Generator], epoch: int) -> dict[str, float]:
    ctx.model.train()
    extra_opts = defense.optimizers()
    tot_loss = tot_correct = seen = 0.0
    for step, idx in enumerate(ctx.sampler.batches(ctx.train_idx, gens["shuffle"]), start=1):
        if idx.numel() == 0:      # possible under Poisson sampling: nothing to learn from
            continue
        x, y = _batch_inputs(ctx, idx, gens["augment"])
        for opt in [ctx.optimizer, *extra_opts]:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16,
                            enabled=ctx.recipe.bf16):
            logits = ctx.model(x)
            features = tap.pop() if tap is not None else None
        s = Step(x=x, y=y, idx=idx, logits=logits.float(),
                 features=None if features is None else features.float(), epoch=epoch, step=step)
        loss = defense.loss(ctx, s)
        if not torch.isfinite(loss):
            raise CRLError(f"training loss = {loss.item()} at epoch {epoch}, step {step} "
                           f"(defense '{defense.name}'): expected a finite value; lower --lr "
                           "or check the data")
        loss.backward()
        for opt in [ctx.optimizer, *extra_opts]:
            opt.step()
        tot_loss += float(loss.detach()) * idx.numel()
        tot_correct += float((s.logits.detach().argmax(1) == y).sum())
        seen += idx.numel()
    seen = max(seen, 1)
    return {"epoch": epoch, "train_loss": tot_loss / seen, "train_acc": tot_correct / seen}


def _save_checkpoint(path, fingerprint, epoch, stopped, ctx, defense, scheduler, gens,
                     history) -> None:
    save_verified(path, {
        "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
        "stopped": bool(stopped),
        "model": ctx.model.state_dict(), "optimizer": ctx.optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "defense": defense.state_dict(),
        "generators": {k: g.get_state() for k, g in gens.items()},
        "torch_rng": torch.get_rng_state(), "history": history,
    })


def _restore(path, fingerprint, ctx, defense, scheduler, gens) -> tuple[list, int]:
    state = load_verified(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CRLError(f"checkpoint {path} is not a crl checkpoint (expected format "
                       f"{CHECKPOINT_FORMAT})")
    if state["fingerprint"] != fingerprint:
        diff = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise CRLError(f"cannot resume from {path}: it was written for another "
                       f"{', '.join(diff)}; expected the same run (start a new --out or drop "
                       "--resume)")
    ctx.model.load_state_dict(state["model"])
    ctx.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    defense.load_state_dict(state["defense"])
    for k, g in gens.items():
        g.set_state(state["generators"][k])
    torch.set_rng_state(state["torch_rng"])
    done = ctx.recipe.epochs if state["stopped"] else int(state["epoch"])
    return list(state["history"]), done + 1


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch metrics as JSON lines (atomic)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))
