"""The audit of a run: `Audit` (what is fixed for the run) and `run_audit` (the command)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

import crl.attacks  # noqa: F401  (registers attacks)
import crl.defenses  # noqa: F401  (registers defenses)
from crl.attacks.base import Attack, build_attack
from crl.audit.canaries import exposure_of, subset_metrics
from crl.audit.factory import ModelCache, ModelFactory, TrainedModel
from crl.audit.outcome import Evaluation, TargetOutcome, save_outcome
from crl.audit.plan import DefenseChoice, ModelJob, plan_models
from crl.audit.runner import run_attacks
from crl.audit.signals import extract_signals, target_pool_of
from crl.canary_spec import parse_canaries
from crl.config import AuditConfig, set_warnings
from crl.data.canaries import CanarySet, make_canaries, save_canaries, with_canaries
from crl.data.splits import PoolSplit, make_pool_split
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.errors import CRLError
from crl.evaluation import evaluate
from crl.models.zoo import MODELS
from crl.recipe import Recipe
from crl.seeding import seed_for
from crl.train import write_metrics
from crl.utils import cache_dir, code_version, write_json_atomic, write_text_atomic


def recipe_of(cfg: AuditConfig) -> Recipe:
    return Recipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=float(cfg.lr),
                  momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                  milestones=tuple(cfg.milestones), augment=cfg.augment, device=cfg.device,
                  bf16=cfg.bf16, channels_last=cfg.channels_last)


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit margin to the decision boundary, g_y - max_{i != y} g_i (the paper's Fig. 6)."""
    z = np.asarray(logits, dtype=np.float64).copy()
    rows = np.arange(len(labels))
    true = z[rows, labels].copy()
    z[rows, labels] = -np.inf
    return true - z.max(1)


def chance_warning(test_acc: float, labels: np.ndarray, num_classes: int) -> str | None:
    """A warning when test accuracy is within noise of always predicting the commonest class."""
    n = max(len(labels), 1)
    chance = float(np.bincount(labels, minlength=num_classes).max() / n)
    slack = max(0.05, 3.0 * math.sqrt(chance * (1.0 - chance) / n))
    if test_acc > chance + slack:
        return None
    return (f"target at chance: this audit measures nothing; test accuracy {100 * test_acc:.1f}% "
            f"vs {100 * chance:.1f}% for always guessing the commonest class, so attack AUCs "
            "near 0.5 mean the model learned nothing, not that it is private; lower --lr, "
            "train longer (--epochs) or choose another --model")


def engine_options(cfg: AuditConfig) -> dict[str, Any]:
    """The options of --engine that the config sets (an unset one keeps the engine's default)."""
    if cfg.engine == "ray" or cfg.ray_address is not None or cfg.ray_chunk is not None:
        return ray_options(cfg)
    if cfg.ensemble_size is None:
        return {}
    if cfg.engine not in ("ensemble", "auto"):
        raise CRLError(f"ensemble_size = {cfg.ensemble_size}: expected --engine ensemble or auto "
                       f"with it (engine '{cfg.engine}' does not train models at once)")
    return {"ensemble_size": cfg.ensemble_size}


def ray_options(cfg: AuditConfig) -> dict[str, Any]:
    """--engine ray's options (--ensemble-size goes to the engine inside each task); the
    --ray-* flags without --engine ray are an error."""
    if cfg.engine != "ray":
        name = "ray_address" if cfg.ray_address is not None else "ray_chunk"
        raise CRLError(f"{name} = {getattr(cfg, name)!r}: expected --engine ray with it "
                       f"(engine '{cfg.engine}' does not use Ray)")
    inner = {} if cfg.ensemble_size is None else {"ensemble_size": cfg.ensemble_size}
    return {"address": cfg.ray_address, "chunk": cfg.ray_chunk, "inner_options": inner}


class Audit:
    """Everything fixed for one run; `audit_one` audits one (defense, seed)."""

    def __init__(self, cfg: AuditConfig, data: ImageData) -> None:
        data, self.canaries = canaries_for(cfg, data)
        self.cfg, self.data = cfg, data
        self.attacks: dict[str, Attack] = {n: build_attack(n, cfg.set.get(n)) for n in cfg.attacks}
        self.requirements = frozenset().union(*(a.requirements() for a in self.attacks.values()))
        optional = frozenset().union(*(a.optional_inputs() for a in self.attacks.values()))
        self.wants_shadows = "shadows" in self.requirements | optional
        self.factory = ModelFactory(
            data, cfg.model, recipe_of(cfg),
            ModelCache(cache_dir() / "models" if cfg.cache else None),
            resume=cfg.resume, progress=cfg.progress, engine=cfg.engine,
            engine_options=engine_options(cfg))

    def split(self, seed: int) -> PoolSplit:
        """The seed's split of the dataset without its canaries."""
        base = len(self.data) if self.canaries is None else self.canaries.base_size
        return split_of(self.data.y.numpy()[:base], seed, self.cfg.subset)

    @property
    def canary_idx(self) -> np.ndarray | None:
        return None if self.canaries is None else self.canaries.idx

    def attacker(self, defense: DefenseChoice) -> DefenseChoice:
        """Shadow/reference models use the target's defense, or none (`--shadow-defense`)."""
        if self.cfg.shadow_defense == "same":
            return defense
        return DefenseChoice("ce")

    def plan(self, defense: DefenseChoice, seed: int, split: PoolSplit) -> list[ModelJob]:
        # canaries are scored pooled over every model as the target: reference models always
        refs = (self.cfg.references
                if "references" in self.requirements or self.canaries is not None else 0)
        shadows = self.cfg.shadows if self.wants_shadows else 0
        return plan_models(split, self.data.y.numpy(), seed, defense, self.attacker(defense),
                           references=refs, shadows=shadows, canaries=self.canary_idx)

    def check(self, defense: DefenseChoice, split: PoolSplit) -> None:
        """Recipe- and data-dependent defense checks for every planned model, before training."""
        recipe = self.factory.recipe
        for job in self.plan(defense, 0, split):
            build_defense(job.defense.name, job.defense.params).check(recipe, len(job.train_idx))

    def train_all(self, jobs: list[ModelJob], tag: str, run_dir: Path | None,
                  split: PoolSplit) -> list[TrainedModel]:
        """The target (checkpointed in run_dir, test accuracy logged) and every
        reference/shadow model, through the factory (cache first)."""
        return self.factory.get_many(jobs, run_dirs={0: run_dir} if run_dir else None,
                                     eval_idx=split.target_nonmembers, desc=f"[{tag}]")

    def audit_one(self, defense: DefenseChoice, seed: int, split: PoolSplit, *,
                  out: Path | None = None) -> TargetOutcome:
        jobs = self.plan(defense, seed, split)
        run_dir = None if out is None else released_dir(out, defense.name, seed)
        models = self.train_all(jobs, f"{defense.name} seed {seed}", run_dir, split)
        pool_models = [m for j, m in zip(jobs, models) if j.role != "shadow"]
        shadow_models = [m for j, m in zip(jobs, models) if j.role == "shadow"]
        target = models[0]
        ev = evaluation_of(split, target, self.canary_idx)
        if run_dir is not None:
            write_released(run_dir, self.factory, target, ev)
        ctx = extract_signals(pool_models, shadow_models, self.data, split, self.requirements,
                              seed, canaries=self.canary_idx)
        n_boot = getattr(self.cfg, "bootstrap", 200)
        attacks = run_attacks(self.attacks, ctx, ev, n_boot=n_boot)
        member = ctx.target.member
        if run_dir is not None and self.canaries is not None:
            write_canary_members(run_dir, jobs, member, ev)
        _, train_acc = evaluate(target.model, self.data, ev.sample_idx[ev.members])
        _, test_acc = evaluate(target.model, self.data, split.target_nonmembers)
        warning = chance_warning(test_acc, self.data.y[split.target_nonmembers].numpy(),
                                 self.data.num_classes)
        return TargetOutcome(
            dataset=self.data.name, model=self.cfg.model, defense=defense.name,
            params=build_defense(defense.name, defense.params).params, seed=seed,
            train_acc=train_acc, test_acc=test_acc, evaluation=ev,
            labels=ctx.target.labels, margins=margins(ctx.target.logits[0], ctx.target.labels),
            attacks=attacks, defense_report=target.report, chance_warning=warning,
            model_member=member, canaries=self.canary_row(attacks, member, ev, seed, n_boot),
            exposure=exposure_of(attacks, member, self.data, ev.sample_idx))

    def canary_row(self, attacks: dict, member: np.ndarray, ev: Evaluation, seed: int,
                   n_boot: int) -> dict[str, Any] | None:
        """{"n", "kind", "attacks": {name: metrics on the canaries alone}} (crl.audit.canaries)."""
        if self.canaries is None:
            return None
        metrics = subset_metrics(attacks, member, ev.sample_idx, ev.canary, n_boot=n_boot,
                                 seed=seed)
        return {"n": self.canaries.n, "kind": self.canaries.kind, "attacks": metrics}


def released_dir(out: Path, defense: str, seed: int) -> Path:
    return Path(out) / "models" / defense / f"seed{seed}"


def split_of(labels: np.ndarray, seed: int, subset: int | None) -> PoolSplit:
    """The pool split of run seed `seed` (its own named stream)."""
    return make_pool_split(labels, seed=seed_for(seed, "split"), subset=subset)


def canaries_for(cfg: AuditConfig, data: ImageData) -> tuple[ImageData, CanarySet | None]:
    """With --canaries: the dataset followed by its canaries, which (when mislabeled) copy
    images outside every seed's target and shadow pools; else (data, None)."""
    if not getattr(cfg, "canaries", None):
        return data, None
    n, kind = parse_canaries(cfg.canaries)
    labels = data.y.numpy()
    used = [np.concatenate([s.target_pool, s.shadow_pool])
            for s in (split_of(labels, seed, cfg.subset) for seed in cfg.seeds)]
    canaries = make_canaries(data, n, kind, np.concatenate(used))
    return with_canaries(data, canaries), canaries


def write_canary_members(run_dir: Path, jobs: list[ModelJob], member: np.ndarray,
                         ev: Evaluation) -> None:
    """canaries.json: which canaries each pool model (in plan order) actually trained on;
    member[k][j] is '1' when model k trained on canary j."""
    labels = [j.label for j in jobs if j.role != "shadow"]
    write_json_atomic(run_dir / "canaries.json", {
        "canary_idx": ev.sample_idx[ev.canary].tolist(), "models": labels,
        "member": ["".join("1" if v else "0" for v in row) for row in member[:, ev.canary]]})


def evaluation_of(split: PoolSplit, target: TrainedModel,
                  canaries: np.ndarray | None = None) -> Evaluation:
    """Members: the target members the released model trained on; held-out ones are neither;
    canaries are neither either (they are scored on their own)."""
    pool = target_pool_of(split, canaries)
    canary = np.zeros(len(pool), bool) if canaries is None else np.isin(pool, canaries)
    members = np.isin(pool, target.trained_on) & np.isin(pool, split.target_members)
    groups = {k: np.isin(pool, v) & ~members & ~canary for k, v in target.groups.items()}
    return Evaluation(pool, members, np.isin(pool, split.target_nonmembers), groups, canary)


def write_released(run_dir: Path, factory: ModelFactory, target: TrainedModel,
                   ev: Evaluation) -> None:
    """model.pt, metrics.jsonl and members.json: every number is recomputable from these.
    members.json lists every sample the released model trained on: "members" (the evaluated
    ones) and, with --canaries, "canaries" (the canaries it trained on, scored on their own);
    "canaries_not_trained_on" are the pool's other canaries."""
    factory.save(run_dir / "model.pt", target)
    write_metrics(run_dir / "metrics.jsonl", target.history)
    members = {"members": ev.sample_idx[ev.members].tolist(),
               "nonmembers": ev.sample_idx[ev.nonmembers].tolist()}
    members.update({k: ev.sample_idx[m].tolist() for k, m in ev.groups.items()})
    if ev.canary is not None and ev.canary.any():
        trained = np.isin(ev.sample_idx, target.trained_on)
        members["canaries"] = ev.sample_idx[ev.canary & trained].tolist()
        members["canaries_not_trained_on"] = ev.sample_idx[ev.canary & ~trained].tolist()
    write_json_atomic(run_dir / "members.json", members)


def validate_names(cfg: AuditConfig) -> list[str]:
    """Fail fast, before any training or writing: unknown names or parameters, too few
    shadow or reference models for an attack. Returns warnings (e.g. unused --set owners)."""
    MODELS.get(cfg.model)
    for d in cfg.defenses:
        build_defense(d, cfg.set.get(d))
    for name in cfg.attacks:
        check_attack_models(name, build_attack(name, cfg.set.get(name)), cfg.references,
                            cfg.shadows)
    if len(set(cfg.defenses)) != len(cfg.defenses):
        raise CRLError(f"defenses = {','.join(cfg.defenses)}: expected each name once")
    return set_warnings(cfg)


def check_attack_models(name: str, attack: Attack, references: int, shadows: int) -> None:
    """A one-line CRLError when `references` or `shadows` are too few for `attack`."""
    need = max(2, attack.min_references)
    if "references" in attack.requirements() and references < need:
        raise CRLError(f"references = {references}: attack '{name}' needs at least "
                       f"{need} reference models")
    if "shadows" in attack.requirements() and shadows < 1:
        raise CRLError(f"shadows = {shadows}: attack '{name}' needs at least 1 shadow model")


def prepare(cfg: AuditConfig, echo: Callable[[str], None] = print
            ) -> tuple[AuditConfig, Audit, dict[int, PoolSplit]]:
    """Every check that can fail, before anything is written: config, names, data, splits,
    the defenses' recipe checks, the device."""
    from crl.data.datasets import load_dataset
    from crl.rundir import check_out_dir
    from crl.utils import resolve_device

    cfg = cfg.resolved()
    check_out_dir(cfg.out)
    for w in validate_names(cfg):
        print(f"crl: warning: {w}", file=sys.stderr)
    resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download)
    audit = Audit(cfg, data)
    splits = {s: audit.split(s) for s in cfg.seeds}
    for d in cfg.defenses:
        audit.check(DefenseChoice(d, cfg.set.get(d, {})), splits[cfg.seeds[0]])
    return cfg, audit, splits


def run_audit(cfg: AuditConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole audit; returns {'rows', 'outcomes', 'out'}. Writes results atomically, in a
    locked run directory."""
    from crl.report import write_report
    from crl.rundir import RunLock, clean_stale_tmp

    cfg, audit, splits = prepare(cfg, echo)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        clean_stale_tmp(out)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        write_json_atomic(out / "version.json", code_version())
        for s, split in splits.items():
            write_json_atomic(out / "splits" / f"seed{s}.json", split.to_dict())
        if audit.canaries is not None:
            save_canaries(out, audit.canaries)
        outcomes = []
        t0 = time.time()
        for d in cfg.defenses:
            for s in cfg.seeds:
                echo(f"[{d} seed {s}] training and attacking ...")
                o = audit.audit_one(DefenseChoice(d, cfg.set.get(d, {})), s, splits[s], out=out)
                if o.chance_warning:
                    echo(f"WARNING [{d} seed {s}]: {o.chance_warning}")
                outcomes.append(o)
        for o in outcomes:
            save_outcome(out / "scores", o)
        rows = [o.row() for o in outcomes]
        table = write_report(out, outcomes, cfg)
        write_json_atomic(out / "results.json", rows)
    echo(table)
    echo(f"wrote {out}/results.json, report.md and figures/ in {time.time() - t0:.0f} s")
    return {"rows": rows, "outcomes": outcomes, "out": out}
