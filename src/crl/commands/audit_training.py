"""Audit the caller's own training code: `audit_training(train_fn, x, y)`.

`train_fn(x_train, y_train, seed) -> nn.Module` is the caller's; `x` and `y` are their data as
tensors. This module is a thin adapter: a model source (`TrainFnSource`, crl.audit.source) that
calls train_fn for every planned model, and a query wrapper (crl.models.query.SampleQueries) that
asks the returned module model(x) on the caller's own inputs. Everything else is `crl audit`'s
code: the pool split, the plan, the signals, the attacks, pooled rows, canaries and the epsilon
bound (crl.audit.pipeline.Audit), the run directory and the report. The seed handed to train_fn is
the planned model's seed cut to 32 bits (`user_seed`), so np.random.seed(seed) takes it.

Run directory (with `out`): what crl audit writes (config.yaml, version.json, splits/,
canaries.json, scores/, results.json, report.md, figures/, vulnerability/, manifest.json last),
with models/user/seed*/ holding members.json and target.pt, reference*.pt, shadow*.pt (state
dicts and training indices in checksummed files, never pickled modules; no model.pt), and
logits/seed*.npz (every model's logits, which crl.attack_signals takes back).
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crl.attacks.base import AttackContext
from crl.audit.factory import TrainedModel
from crl.audit.outcome import Evaluation, TargetOutcome
from crl.audit.pipeline import Audit, audit_targets, write_inputs, write_results
from crl.audit.plan import DefenseChoice, ModelJob
from crl.audit.source import ModelSource, members_of
from crl.config import DEFAULT_ATTACKS, AuditConfig, split_names
from crl.core.errors import CRLError
from crl.core.integrity import save_verified
from crl.core.params import DEFAULT_BOOTSTRAP
from crl.core.utils import atomic_path, write_json_atomic
from crl.models.query import SampleQueries, describe
from crl.rundir import RunDir

USER = "user"    # the "defense" (and data set) of the caller's models: rows, report, run dir
TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


def user_seed(seed: int) -> int:
    """The seed handed to user code: the planned model's seed cut to 32 bits (its low bits;
    crl's own models keep the full seed)."""
    return int(seed) & 0xFFFFFFFF


@dataclass
class UserData:
    """The caller's inputs x [N, ...] (float, any format their model takes) and labels y [N]
    (kept on the CPU for the audit; `y_device` is where train_fn gets them)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    y_device: torch.device | str = "cpu"
    name: str = USER

    @classmethod
    def check(cls, x: Any, y: Any, num_classes: int | None) -> UserData:
        """Validated data, else a one-line CRLError naming the bad value."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise CRLError(f"audit_training.x = {describe(x)}: expected a float tensor "
                           "[samples, ...] of the inputs your model takes")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
            raise CRLError(f"audit_training.y = {describe(y)}: expected an int64 tensor of "
                           f"{x.shape[0]} class ids (one per row of x)")
        if not torch.isfinite(x).all():
            raise CRLError("audit_training.x holds NaN or infinite values: expected finite inputs")
        top = int(y.max()) + 1 if y.numel() else 0
        k = top if num_classes is None else num_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < max(2, top) or int(y.min()) < 0:
            raise CRLError(f"audit_training.num_classes = {k!r}: expected an integer >= 2 with "
                           f"every y in [0, num_classes) (y spans {int(y.min())}..{top - 1})")
        return cls(x, y.cpu(), k, y.device)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def with_canaries(self, canaries: Any) -> UserData:
        """The data followed by the canaries (crl.data.canaries.CanarySet): mislabeled ones copy
        rows of x; noise ones are uniform in [0, 1]."""
        extra = canaries.images
        if extra.dtype == torch.uint8:                 # noise: uint8 draws, scaled to [0, 1]
            extra = extra.float() / 255.0
        x = torch.cat([self.x, extra.to(self.x.device, self.x.dtype)])
        y = torch.cat([self.y, torch.from_numpy(canaries.labels)])
        return UserData(x, y, self.num_classes, self.y_device, self.name)

    def rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x[idx], y[idx]) where the caller keeps them."""
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return self.x[i.to(self.x.device)], self.y[i].to(self.y_device)


class TrainFnSource(ModelSource):
    """The caller's train_fn as the audit's model source; its modules are queried on x."""

    def __init__(self, train_fn: TrainFn, data: UserData, *, batch_size: int = 512,
                 claimed_epsilon: float | None = None) -> None:
        self.train_fn, self.data, self.batch_size = train_fn, data, batch_size
        self.claimed_epsilon = claimed_epsilon
        self.name = getattr(train_fn, "__qualname__", type(train_fn).__name__)
        self.trained_by = (f"Models trained by the caller's own code ({self.name}, "
                           "crl.audit_training)")
        self.on_model: Callable[[], None] = lambda: None

    def follow(self, on_model: Callable[[], None]) -> None:
        self.on_model = on_model

    def train(self, job: ModelJob) -> nn.Module:
        """train_fn on the job's training rows with the job's seed in 32 bits (`user_seed`)."""
        model = self.train_fn(*self.data.rows(job.train_idx), user_seed(job.seed))
        if not isinstance(model, nn.Module):
            raise CRLError(f"train_fn(x_train, y_train, seed) for the {job.label} = "
                           f"{type(model).__name__}: expected the trained torch.nn.Module")
        return model

    def queries(self, model: nn.Module) -> SampleQueries:
        """model(x[idx]) on the caller's inputs, batched, on the model's device."""
        x = self.data.x
        return SampleQueries(model, lambda b, device: x[b.to(x.device)].to(device),
                             self.data.y, self.data.num_classes, batch_size=self.batch_size)

    def models(self, jobs: list[ModelJob], *, run_dir: Path | None, eval_idx: np.ndarray,
               desc: str) -> list[TrainedModel]:
        out = []
        for job in jobs:
            model = self.train(job)
            self.on_model()
            out.append(TrainedModel(model, None, np.asarray(job.train_idx, np.int64),
                                    queries=self.queries(model)))
        return out

    def describe(self, defense: DefenseChoice, target: TrainedModel) -> dict[str, Any]:
        report: dict[str, Any] = {"train_fn": self.name}
        if self.claimed_epsilon is not None:
            report["claimed_epsilon"] = self.claimed_epsilon
        return {"model": type(target.model).__name__, "params": {}, "defense_report": report,
                "claimed_epsilon": self.claimed_epsilon}

    def release(self, run_dir: Path, jobs: list[ModelJob], models: list[TrainedModel],
                ev: Evaluation, signals: AttackContext) -> None:
        """members.json, every model's state dict, and logits/seedS.npz."""
        write_json_atomic(run_dir / "members.json", members_of(ev, models[0].trained_on))
        save_models(run_dir, jobs, models)
        save_logits(run_dir.parents[2] / "logits" / f"{run_dir.name}.npz", signals)


def save_models(folder: Path, jobs: list[ModelJob], models: list[TrainedModel]) -> None:
    """Every model as a checksummed state dict with its role, the seed train_fn got and its
    training indices (the caller rebuilds the module with their own code: no pickled module)."""
    for job, trained in zip(jobs, models):
        name = "target" if job.role == "target" else f"{job.role}{job.index}"
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                 for k, v in trained.model.state_dict().items()}
        save_verified(folder / f"{name}.pt", {
            "state_dict": state, "role": job.role, "index": job.index,
            "seed": user_seed(job.seed), "train_idx": torch.as_tensor(job.train_idx),
            "class": type(trained.model).__qualname__})


def save_logits(path: Path, ctx: AttackContext) -> None:
    """The signals the attacks ran on, compressed: {target,population,shadow}_{logits,member,
    labels,idx} (and _logits_flip); target model 0 is the target, then the references."""
    arrays: dict[str, np.ndarray] = {}
    for part in ("target", "population", "shadow"):
        sig = getattr(ctx, part)
        if sig is not None:
            arrays.update({f"{part}_logits": sig.logits, f"{part}_member": sig.member,
                           f"{part}_labels": sig.labels, f"{part}_idx": sig.sample_idx})
            if sig.logits_flip is not None:
                arrays[f"{part}_logits_flip"] = sig.logits_flip
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def default_attacks(shadows: int) -> list[str]:
    """crl audit's DEFAULT_ATTACKS, less those that need shadow models when there are none."""
    from crl.attacks.base import build_attack

    return [a for a in DEFAULT_ATTACKS
            if shadows or "shadows" not in build_attack(a).requirements()]


def user_config(*, attacks: Any, seeds: Any, references: Any, shadows: Any, bootstrap: Any,
                subset: Any, out: Any, params: Any, canaries: Any,
                progress: bool = True) -> AuditConfig:
    """The run described as a checked AuditConfig (data set and defense 'user'; no recipe:
    the caller's code trained the models), for the audit, config.yaml and the report."""
    def listed(v: Any) -> Any:
        return split_names(v) if isinstance(v, str) else list(v) if isinstance(v, tuple) else v

    if attacks is None:
        attacks = default_attacks(shadows if isinstance(shadows, int) else 0)
    if isinstance(canaries, int) and not isinstance(canaries, bool):
        canaries = str(canaries)
    cfg = AuditConfig(dataset=USER, defenses=[USER], attacks=listed(attacks),
                      seeds=listed(seeds), references=references, shadows=shadows,
                      bootstrap=bootstrap, subset=subset, canaries=canaries,
                      set={} if params is None else params, cache=False, progress=progress,
                      **({} if out is None else {"out": str(out)}))
    return replace(cfg, **cfg.checked())


def check_arguments(train_fn: Any, batch_size: Any, claimed_epsilon: Any) -> None:
    if not callable(train_fn):
        raise CRLError(f"audit_training.train_fn = {type(train_fn).__name__}: expected a "
                       "function train_fn(x_train, y_train, seed) -> torch.nn.Module")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CRLError(f"audit_training.batch_size = {batch_size!r}: expected an integer >= 1")
    if claimed_epsilon is not None and (
            isinstance(claimed_epsilon, bool) or not isinstance(claimed_epsilon, (int, float))
            or not math.isfinite(claimed_epsilon) or claimed_epsilon <= 0):
        raise CRLError(f"audit_training.claimed_epsilon = {claimed_epsilon!r}: expected a "
                       "finite number > 0 (your accountant's epsilon) or None")


def prepare_user_audit(cfg: AuditConfig, data: UserData,
                       source: Callable[[UserData], ModelSource]) -> Audit:
    """Every check that can fail before training: names and counts, canaries, the data."""
    from crl.audit.from_logits import build_attacks
    from crl.audit.pipeline import check_attack_models

    for name, attack in build_attacks(cfg.attacks, cfg.set, "audit_training").items():
        check_attack_models(name, attack, cfg.references, cfg.shadows)
    audit = Audit(cfg, data, source=source)
    if "flip" in audit.requirements and data.x.dim() != 4:
        raise CRLError(f"audit_training.x = {describe(data.x)}: an attack with flip=True "
                       "expected images [samples, channels, height, width] to mirror")
    audit.check(DefenseChoice(USER), audit.split(cfg.seeds[0]))   # reference counts, all seeds
    return audit


def print_user_verdict(outcomes: list[TargetOutcome], folder: Path | None, n_boot: int) -> None:
    """The verdict as `crl audit` prints it: from verdict.json with a run directory, else
    computed (one training audited: no verdict, with the reason)."""
    from crl.audit.pipeline import echo_verdict
    from crl.audit.verdict import compute_verdict, console_lines

    if folder is not None:
        echo_verdict(folder)
    else:
        print("\n".join(console_lines(compute_verdict(outcomes, n_boot=n_boot))))
    print("  (to compare trainings, audit each one and set their rows side by side)")


def run_user_audit(audit: Audit, run: RunDir | None) -> tuple[list, str]:
    """Every seed through the audit's stages, and with `run` the run directory (config.yaml
    names the caller's model class, known once it trained); (outcomes, AUC table)."""
    from crl.report import format_table, write_report

    cfg = audit.cfg
    splits = {s: audit.split(s) for s in cfg.seeds}

    def warn(text: str) -> None:
        warnings.warn(text, RuntimeWarning, stacklevel=5)

    echo = print if cfg.progress else (lambda text: None)
    choice = [DefenseChoice(USER)]
    if run is None:
        outcomes = audit_targets(audit, choice, splits, None, echo=echo, warn=warn)
        return outcomes, format_table(outcomes, "auc", n_boot=cfg.bootstrap)
    with run.claim():
        outcomes = audit_targets(audit, choice, splits, run.out, echo=echo, warn=warn)
        cfg = replace(cfg, model=outcomes[0].model)
        write_inputs(run.out, cfg, splits, audit.canaries)
        return outcomes, write_results(run, outcomes, cfg, write_report, cfg.to_dict())


def audit_source(source: Callable[[UserData], ModelSource], x: torch.Tensor, y: torch.Tensor,
                 cfg: AuditConfig, *, out: str | Path | None = None,
                 num_classes: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """The audit of the models `source(data)` gives on the caller's data x, y (with its
    canaries) under `cfg` (`user_config`), with `out` its run directory: what audit_training
    runs (a test hands it crl's own training as the source)."""
    data = UserData.check(x, y, num_classes)
    audit = prepare_user_audit(cfg, data, source)
    run = None if out is None else RunDir(out, "audit_training", cfg.to_dict(),
                                          overwrite=overwrite, derived=("model",))
    if run is not None:
        run.check()       # another run in `out` is refused before any model trains
    t0 = time.time()
    outcomes, table = run_user_audit(audit, run)
    folder = None if run is None else run.out
    if cfg.progress:
        print(table)
        print(f"audited {len(outcomes)} target(s) in {time.time() - t0:.0f} s"
              + (f"; wrote {folder}" if folder is not None else ""))
        print_user_verdict(outcomes, folder, cfg.bootstrap)
    return {"rows": [o.row() for o in outcomes], "outcomes": outcomes, "out": folder}


def audit_training(train_fn: TrainFn, x: torch.Tensor, y: torch.Tensor, *,
                   attacks: Sequence[str] | str | None = None, references: int = 8,
                   shadows: int = 0, seeds: Sequence[int] = (0,), out: str | Path | None = None,
                   num_classes: int | None = None, batch_size: int = 512, progress: bool = True,
                   subset: int | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                   params: dict[str, dict[str, Any]] | None = None, overwrite: bool = False,
                   canaries: int | str | None = None,
                   claimed_epsilon: float | None = None) -> dict[str, Any]:
    """Audit `train_fn(x_train, y_train, seed) -> nn.Module` on the data x [N, ...], y [N]
    (int64 class ids) as `crl audit` audits a defense: returns {'rows': results.json's rows,
    'outcomes': TargetOutcome per seed, 'out': the run directory or None}. `attacks` defaults
    to crl audit's (less 'nn' without shadows); `params` maps an attack to its parameters;
    `canaries` ('N' or 'N:KIND', as --canaries) adds canaries, each in the target's training
    independently with probability 1/2, and the epsilon lower bound; `claimed_epsilon` (your
    DP accountant's) gives a loud warning when the bound exceeds it; `overwrite` replaces
    another run in `out`; the rest mirrors crl audit's flags."""
    check_arguments(train_fn, batch_size, claimed_epsilon)
    cfg = user_config(attacks=attacks, seeds=seeds, references=references, shadows=shadows,
                      bootstrap=bootstrap, subset=subset, out=out, params=params,
                      canaries=canaries, progress=progress)
    return audit_source(
        lambda data: TrainFnSource(train_fn, data, batch_size=batch_size,
                                   claimed_epsilon=claimed_epsilon),
        x, y, cfg, out=out, num_classes=num_classes, overwrite=overwrite)
