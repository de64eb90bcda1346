"""Audit the caller's own training code: `audit_training(train_fn, x, y)`.

`train_fn(x_train, y_train, seed) -> nn.Module` is the caller's; `x` and `y` are their data as
tensors. crl does the rest with the audit's own stages: the pool split (crl.data.splits, seeded
by name), the plan (crl.audit.plan: the target on the target members, reference models on
complementary halves of the target pool, shadow models on halves of the shadow pool), the
attacks (crl.audit.runner) and the report (crl.report). Only the training is the caller's, and
crl queries the returned models itself: model(x) in eval mode, without gradients, batched.

Run directory (with `out`): config.yaml, version.json, splits/seed*.json, results.json,
report.md, figures/, vulnerability/, scores/ (crl.audit.outcome.save_outcome), and per seed
logits/seed*.npz (every model's logits, which crl.attack_signals takes back) and
models/user/seed*/ (members.json; target.pt, reference*.pt, shadow*.pt: state dicts and
training indices in checksummed files, never pickled modules), and manifest.json last (every
file's sha256; crl.manifest): `out` holds this run alone, as crl audit's --out does.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from crl.attacks.base import Attack, AttackContext
from crl.attacks.signals import Signals
from crl.audit.outcome import Evaluation, TargetOutcome, save_outcome
from crl.audit.plan import DefenseChoice, ModelJob, plan_models
from crl.audit.run import chance_warning, check_attack_models, margins
from crl.audit.runner import run_attacks
from crl.audit.signals import memo
from crl.config import AuditConfig, split_names
from crl.data.splits import PoolSplit, make_pool_split
from crl.errors import CRLError
from crl.evaluation import device_of, eval_mode
from crl.from_logits import build_attacks
from crl.integrity import save_verified
from crl.params import DEFAULT_BOOTSTRAP
from crl.models.gradients import batch_gradient_norms
from crl.rundir import RunDir
from crl.seeding import seed_for
from crl.utils import atomic_path, code_version, write_json_atomic, write_text_atomic

DEFAULT_ATTACKS = ("loss", "confidence", "entropy", "mentr", "gradx", "lira", "rmia")
USER = "user"    # the "defense" of the caller's models: rows, report and run directory
TrainFn = Callable[[torch.Tensor, torch.Tensor, int], nn.Module]


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


@dataclass
class UserData:
    """The caller's inputs x [N, ...] (float, any format their model takes) and labels y [N]."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    @classmethod
    def check(cls, x: Any, y: Any, num_classes: int | None) -> UserData:
        """Validated data, else a one-line CRLError naming the bad value."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            raise CRLError(f"audit_training.x = {_describe(x)}: expected a float tensor "
                           "[samples, ...] of the inputs your model takes")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
            raise CRLError(f"audit_training.y = {_describe(y)}: expected an int64 tensor of "
                           f"{x.shape[0]} class ids (one per row of x)")
        if not torch.isfinite(x).all():
            raise CRLError("audit_training.x holds NaN or infinite values: expected finite inputs")
        top = int(y.max()) + 1 if y.numel() else 0
        k = top if num_classes is None else num_classes
        if isinstance(k, bool) or not isinstance(k, int) or k < max(2, top) or int(y.min()) < 0:
            raise CRLError(f"audit_training.num_classes = {k!r}: expected an integer >= 2 with "
                           f"every y in [0, num_classes) (y spans {int(y.min())}..{top - 1})")
        return cls(x, y, k)

    @property
    def labels(self) -> np.ndarray:
        return self.y.cpu().numpy()


class Queries:
    """The caller's models on the caller's inputs: logits and input-gradient norms, batched,
    in eval mode (each model's mode is restored afterwards), on the model's device."""

    def __init__(self, data: UserData, batch_size: int, flip: bool) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CRLError(f"audit_training.batch_size = {batch_size!r}: expected an integer "
                           ">= 1")
        if flip and data.x.dim() != 4:
            raise CRLError(f"audit_training.x = {_describe(data.x)}: an attack with flip=True "
                           "expected images [samples, channels, height, width] to mirror")
        self.data, self.batch_size, self.flip = data, batch_size, flip

    def _batches(self, model: nn.Module, idx: np.ndarray
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = device_of(model)
        with eval_mode(model):
            for start in range(0, len(idx), self.batch_size):
                b = torch.as_tensor(idx[start:start + self.batch_size], dtype=torch.long)
                yield b, self.data.x[b.to(self.data.x.device)].to(device)

    def logits(self, model: nn.Module, idx: np.ndarray, flip: bool = False) -> np.ndarray:
        """float32 logits [len(idx), num_classes] of model(x[idx]) (mirrored with `flip`)."""
        out = []
        with torch.no_grad():
            for _, xb in self._batches(model, idx):
                out.append(model(xb.flip(-1) if flip else xb))
        c = self.data.num_classes
        if not all(isinstance(o, torch.Tensor) for o in out):
            kind = next(type(o).__name__ for o in out if not isinstance(o, torch.Tensor))
            raise CRLError(f"model(x) of {type(model).__name__} returned a {kind}: expected "
                           f"a tensor of logits [samples, {c}] (wrap the model to return only "
                           "its logits)")
        t = torch.cat([o.float().cpu() for o in out])
        z = t.numpy()
        if z.shape != (len(idx), c) or not np.isfinite(z).all():
            raise CRLError(f"model(x) of {type(model).__name__} = {_describe(t)}"
                           f"{'' if np.isfinite(z).all() else ' with NaN or inf'}: expected "
                           f"finite logits [samples, {c}] (num_classes)")
        return z

    def grad_norms(self, model: nn.Module, idx: np.ndarray) -> np.ndarray:
        """Per-sample input-gradient norms of the cross-entropy, on x as given (Grad-x)."""
        return torch.cat([batch_gradient_norms(model, xb, self.data.y[b.to(self.data.y.device)])
                          for b, xb in self._batches(model, idx)]).numpy()

    def signals(self, pairs: list[tuple[ModelJob, nn.Module]], idx: np.ndarray,
                population: bool = False) -> Signals:
        """Logits of every model on x[idx]; membership from what each was trained on
        (none, for a population)."""
        models = [m for _, m in pairs]
        member = np.stack([np.zeros(len(idx), bool) if population else np.isin(idx, j.train_idx)
                           for j, _ in pairs])
        flipped = np.stack([self.logits(m, idx, True) for m in models]) if self.flip else None
        return Signals(np.stack([self.logits(m, idx) for m in models]), member,
                       self.data.labels[idx], idx, flipped)

    def context(self, jobs: list[ModelJob], models: list[nn.Module], split: PoolSplit,
                requirements: frozenset[str], seed: int) -> AttackContext:
        """The AttackContext of one target, as crl.audit.signals.extract_signals builds it."""
        pool = [(j, m) for j, m in zip(jobs, models) if j.role != "shadow"]
        shadows = [(j, m) for j, m in zip(jobs, models) if j.role == "shadow"]
        ctx = AttackContext(target=self.signals(pool, split.target_pool),
                            num_classes=self.data.num_classes, seed=seed)
        if "population" in requirements:
            ctx.population = self.signals(pool, split.shadow_pool, population=True)
        if shadows:
            ctx.shadow = self.signals(shadows, split.shadow_pool)
        if "input_gradients" in requirements:
            ctx.gradient_scores = memo(lambda k: self.grad_norms(pool[k][1], split.target_pool))
            if shadows:
                ctx.shadow_gradient_scores = memo(
                    lambda k: self.grad_norms(shadows[k][1], split.shadow_pool))
        return ctx


def user_config(attacks: Any, seeds: Any, references: Any, shadows: Any, bootstrap: Any,
                subset: Any, out: Any, params: Any) -> AuditConfig:
    """The run described as a checked AuditConfig (dataset and defense 'user'; no recipe: the
    caller's code trained the models), for the report and config.yaml."""
    def listed(v: Any) -> Any:
        return split_names(v) if isinstance(v, str) else list(v) if isinstance(v, tuple) else v

    cfg = AuditConfig(dataset=USER, defenses=[USER], attacks=listed(attacks), seeds=listed(seeds),
                      references=references, shadows=shadows, bootstrap=bootstrap,
                      subset=subset, set={} if params is None else params, cache=False,
                      **({} if out is None else {"out": str(out)}))
    return dataclasses.replace(cfg, **cfg.checked())


@dataclass
class UserAudit:
    """What is fixed for one audit of the caller's training; `audit_one` audits one seed."""

    train_fn: TrainFn
    data: UserData
    cfg: AuditConfig
    attacks: dict[str, Attack]
    queries: Queries
    progress: bool = True

    @property
    def requirements(self) -> frozenset[str]:
        return frozenset().union(*(a.requirements() for a in self.attacks.values()))

    def plan(self, seed: int, split: PoolSplit) -> list[ModelJob]:
        """The audit's plan (crl.audit.plan) with the caller's code as the 'defense'."""
        optional = frozenset().union(*(a.optional_inputs() for a in self.attacks.values()))
        refs = self.cfg.references if "references" in self.requirements else 0
        shadows = self.cfg.shadows if "shadows" in self.requirements | optional else 0
        return plan_models(split, self.data.labels, seed, DefenseChoice(USER),
                           DefenseChoice(USER), references=refs, shadows=shadows)

    def train(self, job: ModelJob) -> nn.Module:
        """train_fn on the job's training rows with the job's own seed (a named stream)."""
        idx = torch.as_tensor(job.train_idx, dtype=torch.long)
        model = self.train_fn(self.data.x[idx.to(self.data.x.device)],
                              self.data.y[idx.to(self.data.y.device)], job.seed)
        if not isinstance(model, nn.Module):
            raise CRLError(f"train_fn(x_train, y_train, seed) for the {job.label} = "
                           f"{type(model).__name__}: expected the trained torch.nn.Module")
        return model

    def split(self, seed: int) -> PoolSplit:
        return make_pool_split(self.data.labels, seed=seed_for(seed, "split"),
                               subset=self.cfg.subset)

    def audit_one(self, seed: int, split: PoolSplit
                  ) -> tuple[TargetOutcome, list[ModelJob], list[nn.Module], AttackContext]:
        """Train every planned model, query them, run the attacks: one seed's outcome."""
        from tqdm import tqdm

        jobs = self.plan(seed, split)
        models = [self.train(j) for j in tqdm(jobs, desc=f"[{USER} seed {seed}] train_fn",
                                              disable=not self.progress, leave=False)]
        ctx = self.queries.context(jobs, models, split, self.requirements, seed)
        pool = split.target_pool
        # the caller's model trained on exactly the target members it was given: none held out
        ev = Evaluation(pool, np.isin(pool, split.target_members),
                        np.isin(pool, split.target_nonmembers))
        attacks = run_attacks(self.attacks, ctx, ev, n_boot=self.cfg.bootstrap)
        z, y = ctx.target.logits[0], ctx.target.labels
        correct = z.argmax(1) == y
        test_acc = float(correct[ev.nonmembers].mean())
        outcome = TargetOutcome(
            dataset=USER, model=type(models[0]).__name__, defense=USER, params={}, seed=seed,
            train_acc=float(correct[ev.members].mean()), test_acc=test_acc, evaluation=ev,
            labels=y, margins=margins(z, y), attacks=attacks,
            defense_report={"train_fn": getattr(self.train_fn, "__qualname__",
                                                type(self.train_fn).__name__)},
            chance_warning=chance_warning(test_acc, y[ev.nonmembers], self.data.num_classes))
        return outcome, jobs, models, ctx


def save_models(folder: Path, jobs: list[ModelJob], models: list[nn.Module]) -> None:
    """Every model as a checksummed state dict with its role, seed and training indices (the
    caller rebuilds the module with their own code: no pickled module is ever stored)."""
    for job, model in zip(jobs, models):
        name = "target" if job.role == "target" else f"{job.role}{job.index}"
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                 for k, v in model.state_dict().items()}
        save_verified(folder / f"{name}.pt", {
            "state_dict": state, "role": job.role, "index": job.index, "seed": job.seed,
            "train_idx": torch.as_tensor(job.train_idx), "class": type(model).__qualname__})


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


def audit_seeds(audit: UserAudit, splits: dict[int, PoolSplit],
                out: Path | None = None) -> list[TargetOutcome]:
    """Every seed's outcome (warning at chance); with `out`, each seed's members.json, models
    and logits as soon as it is done."""
    outcomes = []
    for seed, split in splits.items():
        outcome, jobs, models, ctx = audit.audit_one(seed, split)
        if outcome.chance_warning:
            warnings.warn(f"[{USER} seed {seed}] {outcome.chance_warning}", RuntimeWarning,
                          stacklevel=3)
        if out is not None:
            folder, ev = out / "models" / USER / f"seed{seed}", outcome.evaluation
            write_json_atomic(folder / "members.json", {
                "members": ev.sample_idx[ev.members].tolist(),
                "nonmembers": ev.sample_idx[ev.nonmembers].tolist()})
            save_models(folder, jobs, models)
            save_logits(out / "logits" / f"seed{seed}.npz", ctx)
        outcomes.append(outcome)
    return outcomes


def write_run(run: RunDir, audit: UserAudit, splits: dict[int, PoolSplit],
              outcomes: list[TargetOutcome]) -> str:
    """config.yaml, version.json, splits, scores, results.json, the report and, last, the
    manifest (the config with the caller's model class); the AUC table."""
    from crl.report import write_report

    out = run.out
    cfg = dataclasses.replace(audit.cfg, model=outcomes[0].model)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json_atomic(out / "version.json", code_version())
    for s, split in splits.items():
        write_json_atomic(out / "splits" / f"seed{s}.json", split.to_dict())
    for o in outcomes:
        save_outcome(out / "scores", o)
    table = write_report(out, outcomes, cfg)
    write_json_atomic(out / "results.json", [o.row() for o in outcomes])
    run.finish(cfg.to_dict())
    return table


def prepare_user_audit(train_fn: Any, x: Any, y: Any, cfg: AuditConfig, *,
                       num_classes: int | None, batch_size: int, progress: bool) -> UserAudit:
    """Every check that can fail before training: the function, data, names and counts."""
    if not callable(train_fn):
        raise CRLError(f"audit_training.train_fn = {type(train_fn).__name__}: expected a "
                       "function train_fn(x_train, y_train, seed) -> torch.nn.Module")
    data = UserData.check(x, y, num_classes)
    attacks = build_attacks(cfg.attacks, cfg.set, "audit_training")
    for name, attack in attacks.items():
        check_attack_models(name, attack, cfg.references, cfg.shadows)
    flip = any("flip" in a.requirements() for a in attacks.values())
    return UserAudit(train_fn, data, cfg, attacks, Queries(data, batch_size, flip), progress)


def print_user_verdict(outcomes: list[TargetOutcome], folder: Path | None, n_boot: int) -> None:
    """The verdict as `crl audit` prints it: from verdict.json with a run directory, else
    computed (one training audited: no verdict, with the reason)."""
    from crl.audit.run import echo_verdict
    from crl.verdict import compute_verdict, console_lines

    if folder is not None:
        echo_verdict(folder)
    else:
        print("\n".join(console_lines(compute_verdict(outcomes, n_boot=n_boot))))
    print("  (to compare trainings, audit each one and set their rows side by side)")


def audit_training(train_fn: TrainFn, x: torch.Tensor, y: torch.Tensor, *,
                   attacks: Sequence[str] | str = DEFAULT_ATTACKS, references: int = 8,
                   shadows: int = 0, seeds: Sequence[int] = (0,), out: str | Path | None = None,
                   num_classes: int | None = None, batch_size: int = 512, progress: bool = True,
                   subset: int | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                   params: dict[str, dict[str, Any]] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Audit `train_fn(x_train, y_train, seed) -> nn.Module` on the data x [N, ...], y [N]
    (int64 class ids) as `crl audit` audits a defense: returns {'rows': results.json's rows,
    'outcomes': TargetOutcome per seed, 'out': the run directory or None}. `params` maps an
    attack to its parameters; `overwrite` replaces another run in `out`; the rest mirrors
    crl audit's flags."""
    from crl.report import format_table

    cfg = user_config(attacks, seeds, references, shadows, bootstrap, subset, out, params)
    audit = prepare_user_audit(train_fn, x, y, cfg, num_classes=num_classes,
                               batch_size=batch_size, progress=progress)
    run = None if out is None else RunDir(out, "audit_training", cfg.to_dict(),
                                          overwrite=overwrite, derived=("model",))
    if run is not None:
        run.check()       # another run in `out` is refused before any model trains
    splits = {s: audit.split(s) for s in cfg.seeds}
    t0, folder = time.time(), None if run is None else run.out
    if run is None:
        outcomes = audit_seeds(audit, splits)
        table = format_table(outcomes, "auc", n_boot=cfg.bootstrap)
    else:
        with run.claim():
            outcomes = audit_seeds(audit, splits, folder)
            table = write_run(run, audit, splits, outcomes)
    if progress:
        print(table)
        print(f"audited {len(outcomes)} target(s) in {time.time() - t0:.0f} s"
              + (f"; wrote {folder}" if folder is not None else ""))
        print_user_verdict(outcomes, folder, cfg.bootstrap)
    return {"rows": [o.row() for o in outcomes], "outcomes": outcomes, "out": folder}
