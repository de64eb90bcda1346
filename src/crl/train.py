"""`fit`: the one training loop every defense plugs into, plus checkpoints and model files."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from crl.data.types import ImageData, normalize
from crl.defenses.base import Defense, FitContext
from crl.errors import CRLError
from crl.models.features import FeatureTap, last_linear
from crl.utils import resolve_device, torch_save_atomic, write_text_atomic

MODEL_FORMAT = "crl-model-1"
CHECKPOINT_FORMAT = "crl-checkpoint-1"


@dataclass
class Recipe:
    """How to train: SGD with momentum and weight decay, multistep LR schedule."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = False
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CRLError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise CRLError(f"{name} must be a non-negative number, got {v!r}")
        if self.lr == 0:
            raise CRLError("lr must be positive, got 0")
        if any(m <= 0 for m in self.milestones):
            raise CRLError(f"milestones must be positive epochs, got {list(self.milestones)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class FitResult:
    model: nn.Module
    defense: Defense
    history: list[dict[str, float]] = field(default_factory=list)
    train_idx: np.ndarray | None = None   # what the model finally trained on (defenses may change it)


def _lr_lambda(milestones: tuple[int, ...], gamma: float):
    def f(epoch_done: int) -> float:
        return gamma ** sum(1 for m in milestones if epoch_done >= m)

    return f


def fit(
    model: nn.Module,
    data: ImageData,
    train_idx,
    recipe: Recipe,
    defense: Defense | None = None,
    *,
    eval_idx=None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train `model` on data[train_idx] with `defense` (default: plain cross-entropy).

    Every epoch: metrics appended to run_dir/metrics.jsonl and an atomic checkpoint
    run_dir/checkpoint.pt; `resume=True` continues from it and ends with exactly the weights an
    uninterrupted run gives. Returns the trained model (on the recipe's device).
    """
    defense = defense or Defense()
    device = resolve_device(recipe.device)
    train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
    if train_idx.numel() == 0:
        raise CRLError("no training samples: the training split is empty")
    if eval_idx is not None:
        eval_idx = torch.as_tensor(np.asarray(eval_idx), dtype=torch.long)

    model = model.to(device)
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    ctx = FitContext(
        model=model, optimizer=optimizer, x=data.x, y=data.y, train_idx=train_idx,
        num_classes=data.num_classes, feat_dim=last_linear(model)[1].in_features,
        device=device, epochs=recipe.epochs, batch_size=recipe.batch_size, seed=recipe.seed,
        mean=data.mean, std=data.std, generator=generator, recipe=recipe,
    )
    defense.prepare(ctx)
    model, optimizer = ctx.model, ctx.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(recipe.milestones, recipe.gamma)
    )
    tap = FeatureTap(model) if defense.needs_features else None

    history: list[dict[str, float]] = []
    start_epoch = 1
    ckpt_path = Path(run_dir) / "checkpoint.pt" if run_dir is not None else None
    fingerprint = {"recipe": recipe.to_dict(), "defense": defense.name,
                   "params": _jsonable(defense.params), "n_train": int(train_idx.numel())}
    if resume and ckpt_path is not None and ckpt_path.exists():
        state = _load_checkpoint(ckpt_path)
        if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise CRLError(f"cannot resume from {ckpt_path}: it was written by a different "
                           "recipe, defense or split (start a new --out or drop --resume)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        defense.load_state_dict(state["defense"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        ctx.train_idx = state["train_idx"]
        history = state["history"]
        start_epoch = state["epoch"] + 1

    try:
        bar = tqdm(range(start_epoch, recipe.epochs + 1), desc=desc, disable=not progress,
                   leave=False, initial=start_epoch - 1, total=recipe.epochs, dynamic_ncols=True)
        for epoch in bar:
            row = _train_one_epoch(ctx, defense, tap, recipe, epoch)
            row.update({k: float(v) for k, v in defense.extra_metrics().items()})
            if eval_idx is not None and eval_idx.numel():
                # monitoring only: same precision as training (attacks use fp32 logits)
                row["test_loss"], row["test_acc"] = evaluate(model, data, eval_idx,
                                                             batch_size=max(recipe.batch_size, 256),
                                                             bf16=recipe.bf16)
            row["lr"] = optimizer.param_groups[0]["lr"]
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                            **({"test": f"{row['test_acc']:.3f}"} if "test_acc" in row else {}))
            scheduler.step()
            stop = defense.end_epoch(ctx, epoch)
            if run_dir is not None:
                write_metrics(Path(run_dir) / "metrics.jsonl", history)
                torch_save_atomic({
                    "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "defense": defense.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                    "train_idx": ctx.train_idx, "history": history,
                }, ckpt_path)
            if stop:
                break
        defense.finish(ctx)
    finally:
        if tap is not None:
            tap.remove()
    return FitResult(model=ctx.model, defense=defense, history=history,
                     train_idx=ctx.train_idx.numpy())


def _train_one_epoch(ctx: FitContext, defense: Defense, tap: FeatureTap | None,
                     recipe: Recipe, epoch: int) -> dict[str, float]:
    from crl.data.augment import augment_batch

    model, optimizer = ctx.model, ctx.optimizer
    extra_opts = defense.optimizers()
    model.train()
    n = ctx.train_idx.numel()
    perm = ctx.train_idx[torch.randperm(n, generator=ctx.generator)]
    tot_loss = tot_correct = 0.0
    for step, start in enumerate(range(0, n, recipe.batch_size)):
        idx = perm[start:start + recipe.batch_size]
        xb = normalize(ctx.x[idx].to(ctx.device), ctx.mean, ctx.std)
        yb = ctx.y[idx].to(ctx.device)
        if recipe.augment:
            xb = augment_batch(xb, ctx.generator)
        if recipe.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        defense.before_step(ctx, xb, yb, epoch)
        optimizer.zero_grad(set_to_none=True)
        for opt in extra_opts:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16,
                            enabled=recipe.bf16):
            logits = model(xb)
            features = tap.pop() if tap is not None else None
        logits = logits.float()
        features = features.float() if features is not None else None
        loss = defense.loss(logits, features, yb, epoch)
        if not torch.isfinite(loss):
            raise CRLError(
                f"training loss became {loss.item()} at epoch {epoch}, step {step + 1} "
                f"(defense '{defense.name}'); expected a finite value: lower --lr or check the data"
            )
        loss.backward()
        optimizer.step()
        for opt in extra_opts:
            opt.step()
        defense.after_step(ctx, epoch)
        tot_loss += float(loss.detach()) * idx.numel()
        tot_correct += float((logits.detach().argmax(1) == yb).sum())
    return {"epoch": epoch, "train_loss": tot_loss / n, "train_acc": tot_correct / n}


def eval_batches(model: nn.Module, data: ImageData, idx, batch_size: int):
    """Yield (dataset indices, normalised inputs on the model's device) with the model in eval
    mode; its train/eval mode is restored afterwards."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, idx.numel(), batch_size):
            b = idx[start:start + batch_size]
            yield b, normalize(data.x[b].to(device), data.mean, data.std)
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageData, idx, *, batch_size: int = 512,
                   flip: bool = False, bf16: bool = False) -> torch.Tensor:
    """float32 logits [len(idx), C] on the CPU, in eval mode (optionally on flipped inputs).

    bf16=True computes under bfloat16 autocast (fast monitoring; attacks keep the default).
    """
    out = []
    for _, xb in eval_batches(model, data, idx, batch_size):
        if flip:
            xb = xb.flip(-1)
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0, data.num_classes)


def evaluate(model: nn.Module, data: ImageData, idx, *, batch_size: int = 512,
             bf16: bool = False) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on data[idx]."""
    logits = predict_logits(model, data, idx, batch_size=batch_size, bf16=bf16).double()
    y = data.y[torch.as_tensor(np.asarray(idx), dtype=torch.long)]
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def write_metrics(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch metrics as JSON lines (atomic)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in history))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CRLError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CRLError(f"{path} is not a crl checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def save_model(path: str | Path, model: nn.Module, *, arch: str, in_channels: int,
               image_size: int, num_classes: int, mean, std, extra: dict | None = None,
               opacus_fixed: bool = False) -> None:
    """Write a self-describing model file (weights + how to rebuild the architecture).

    opacus_fixed: the model went through Opacus's ModuleValidator.fix (BatchNorm -> GroupNorm),
    so loading must rebuild it the same way.
    """
    torch_save_atomic({
        "format": MODEL_FORMAT, "arch": arch, "in_channels": in_channels, "opacus_fixed": opacus_fixed,
        "image_size": image_size, "num_classes": num_classes,
        "mean": list(map(float, mean)), "std": list(map(float, std)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }, path)


def load_model(path: str | Path) -> nn.Module:
    """The trained nn.Module saved by `save_model` (weights_only=True: a file cannot run code)."""
    return load_model_file(path)[0]


def load_model_file(path: str | Path) -> tuple[nn.Module, dict]:
    """(model, the `extra` dict stored with it) from a file written by `save_model`."""
    from crl.models import create_model

    path = Path(path)
    if not path.exists():
        raise CRLError(f"model file {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CRLError(f"cannot read model file {path}: {type(e).__name__}".splitlines()[0]) from e
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CRLError(f"{path} is not a crl model file (expected format {MODEL_FORMAT})")
    model = create_model(blob["arch"], blob["in_channels"], blob["image_size"], blob["num_classes"])
    if blob.get("opacus_fixed"):
        from crl.defenses.dpsgd import opacus_compatible

        model = opacus_compatible(model)
    model.load_state_dict(blob["state_dict"])
    model.crl_normalization = (tuple(blob["mean"]), tuple(blob["std"]))  # type: ignore[attr-defined]
    return model.eval(), blob.get("extra", {})
