"""The audit of a run: `Audit` (what is fixed for the run) and `run_audit` (the command)."""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import crl.attacks  # registers attacks
import crl.defenses  # noqa: F401  (registers defenses)
from crl.attacks.base import Attack, AttackContext, build_attack
from crl.audit.attacking import run_attacks
from crl.audit.canary_metrics import exposure_of, subset_metrics
from crl.audit.epsilon import canary_epsilon, epsilon_attack_name
from crl.audit.factory import ModelCache, ModelFactory, TrainedModel
from crl.audit.outcome import AttackOutcome, Evaluation, TargetOutcome, save_outcome
from crl.audit.plan import DefenseChoice, ModelJob, models_needed, plan_models, planned_membership
from crl.audit.progress import AuditProgress
from crl.audit.signal_extraction import extract_signals, target_pool_of
from crl.audit.source import FactorySource, ModelSource
from crl.config import AuditConfig, set_warnings
from crl.core.canary_spec import parse_canaries
from crl.core.errors import CRLError
from crl.core.seeding import seed_for
from crl.core.utils import cache_dir, code_version, write_json_atomic, write_text_atomic
from crl.data.canaries import CanarySet, make_canaries, save_canaries, with_canaries
from crl.data.splits import PoolSplit, make_pool_split
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.models.zoo import MODELS
from crl.training.recipe import Recipe


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


def factory_source(cfg: AuditConfig, data: ImageData) -> FactorySource:
    """crl's own models for `cfg` (engine, recipe, model cache) on `data`."""
    factory = ModelFactory(
        data, cfg.model, recipe_of(cfg), ModelCache(cache_dir() / "models" if cfg.cache else None),
        resume=cfg.resume, progress=cfg.progress, engine=cfg.engine,
        engine_options=engine_options(cfg))
    return FactorySource(factory, cfg.model)


def models_used(attacks: dict[str, Attack], outcomes: dict[str, AttackOutcome],
                ctx: AttackContext, trained_by: str) -> dict[str, Any]:
    """What ran, for the report's header: how the models were trained, the reference and
    shadow models the target had, and which models each attack used: 'target', 'references'
    (its scores need them), 'references (pooled rows)' (only its leave-one-out rows, every
    pool model as the target), 'shadows'."""
    refs = ctx.target.logits.shape[0] - 1
    shadows = 0 if ctx.shadow is None else ctx.shadow.logits.shape[0]
    used = {}
    for name, a in attacks.items():
        kinds = ["target"]
        if refs and "references" in a.requirements():
            kinds.append("references")
        elif refs and outcomes[name].pooled is not None:
            kinds.append("references (pooled rows)")
        if shadows and "shadows" in a.requirements() | a.optional_inputs():
            kinds.append("shadows")
        used[name] = kinds
    return {"trained_by": trained_by, "references": refs, "shadows": shadows, "attacks": used}


class Audit:
    """Everything fixed for one run; `audit_one` audits one (defense, seed). The models come
    from a model source (crl.audit.source): crl's own factory unless `source` builds another
    from the data (with its canaries)."""

    def __init__(self, cfg: AuditConfig, data: Any,
                 source: Callable[[Any], ModelSource] | None = None) -> None:
        data, self.canaries = canaries_for(cfg, data)
        self.cfg, self.data, self.labels = cfg, data, data.y.cpu().numpy()
        self.attacks: dict[str, Attack] = {n: build_attack(n, cfg.set.get(n)) for n in cfg.attacks}
        epsilon_attack_name(cfg.epsilon_attack, cfg.attacks)   # a bad name fails before training
        self.requirements = frozenset().union(*(a.requirements() for a in self.attacks.values()))
        optional = frozenset().union(*(a.optional_inputs() for a in self.attacks.values()))
        self.wants_shadows = "shadows" in self.requirements | optional
        self.source = factory_source(cfg, data) if source is None else source(data)
        if "oracle" in self.requirements and not self.source.label_queries:
            name = next(n for n, a in self.attacks.items() if "oracle" in a.requirements())
            raise CRLError(f"attacks = {name}: attack '{name}' queries the models on inputs it "
                           "builds, which this model source does not offer; expected crl's "
                           "own image models (crl audit)")
        self.progress: AuditProgress | None = None

    def follow(self, progress: AuditProgress) -> None:
        """Report every model served or trained, and each attack, to `progress`."""
        self.progress = progress
        self.source.follow(progress.model_done)

    def split(self, seed: int) -> PoolSplit:
        """The seed's split of the dataset without its canaries."""
        base = len(self.labels) if self.canaries is None else self.canaries.base_size
        return split_of(self.labels[:base], seed, self.cfg.subset)

    @property
    def canary_idx(self) -> np.ndarray | None:
        return None if self.canaries is None else self.canaries.idx

    def attacker(self, defense: DefenseChoice) -> DefenseChoice:
        """Shadow/reference models use the target's defense, or none (`--shadow-defense`)."""
        if self.cfg.shadow_defense == "same":
            return defense
        return DefenseChoice("ce")

    def unpooled(self, defense: DefenseChoice) -> str | None:
        """Why the reference models may not be pooled with the target (None: they may): pooled
        numbers hold only models trained with the target's defense."""
        if self.attacker(defense) == defense:
            return None
        return (f"the reference models trained without '{defense.name}' (--shadow-defense "
                f"{self.cfg.shadow_defense}): no other model shares the target's defense")

    def plan(self, defense: DefenseChoice, seed: int, split: PoolSplit, *,
             references: int | None = None) -> list[ModelJob]:
        # canaries are scored pooled over every model as the target: reference models always
        refs = self.cfg.references if references is None else references
        refs = refs if "references" in self.requirements or self.canaries is not None else 0
        shadows = self.cfg.shadows if self.wants_shadows else 0
        return plan_models(split, self.labels, seed, defense, self.attacker(defense),
                           references=refs, shadows=shadows, canaries=self.canary_idx)

    def check(self, defense: DefenseChoice, split: PoolSplit) -> None:
        """Recipe- and data-dependent defense checks for every planned model, and the
        reference counts of every seed, before training."""
        self.source.check(self.plan(defense, 0, split))
        for seed in self.cfg.seeds:
            for w in self.check_references(defense, seed, self.split(seed)):
                print(f"crl: warning: {w}", file=sys.stderr)

    def check_references(self, defense: DefenseChoice, seed: int,
                         split: PoolSplit) -> list[str]:
        """Before training, from what each model will actually train on (a defense may hold
        part of its data out): a one-line CRLError when some sample would lack the IN or OUT
        reference models an attack needs to score the target, or, when the models hold data
        out, the leave-one-out rows, naming the number of references needed. Without hold-outs
        a leave-one-out shortfall (only at the attacks' smallest reference counts) is a
        warning (returned) and the row is skipped and named in the report."""
        needs = {n: a.per_sample_references for n, a in self.attacks.items()
                 if "references" in a.requirements() and any(a.per_sample_references)}
        refs, warnings = self.cfg.references, []
        if not needs:
            return warnings
        holds_out = self.holds_out(defense, seed, split)
        for every in (False, True) if self.unpooled(defense) is None else (False,):
            fits = self._references_needed(defense, seed, split, needs, every)
            short = {n: v for n, v in fits.items() if v != refs}
            if not short:
                continue
            name = max(short, key=lambda n: -1 if short[n] is None else short[n])
            need_in, need_out = needs[name]
            more = (f"more than {max(4 * refs, 256)}" if short[name] is None
                    else str(short[name]))
            what = (f"references = {refs}: attack '{name}' on '{defense.name}' (seed {seed}) "
                    f"needs {more} reference models {'for its leave-one-out row ' * every}so "
                    f"that every sample is IN (trained on) for >= {need_in} and OUT for >= "
                    f"{need_out} of the models other than the one scored ("
                    f"'{self.attacker(defense).name}' models may hold part of their data out)")
            if not every or holds_out:
                raise CRLError(f"{what}: expected --references at least that")
            warnings.append(f"{what}; with fewer the row is skipped and named in the report")
        return warnings

    def holds_out(self, defense: DefenseChoice, seed: int, split: PoolSplit) -> bool:
        """Whether some planned pool model's defense holds part of what it is handed out."""
        jobs = [j for j in self.plan(defense, seed, split) if j.role != "shadow"]
        _, held = planned_membership(jobs, target_pool_of(split, self.canary_idx),
                                     self.held_out)
        return bool(held.any())

    def _references_needed(self, defense: DefenseChoice, seed: int, split: PoolSplit,
                           needs: dict[str, tuple[int, int]], every: bool
                           ) -> dict[str, int | None]:
        """Per attack: the fewest references (at least --references) that give every sample
        the IN/OUT models `needs` asks for (every model left out in turn, or the target);
        None when even max(4 x references, 256) are too few."""
        refs = self.cfg.references
        fits: dict[str, int | None] = {}
        for cap in (refs, max(4 * refs, 256)):
            jobs = [j for j in self.plan(defense, seed, split, references=cap)
                    if j.role != "shadow"]
            member, held = planned_membership(jobs, target_pool_of(split, self.canary_idx),
                                              self.held_out)
            fits = {n: models_needed(member, held, *need, refs + 1, every_model=every)
                    for n, need in needs.items()}
            fits = {n: None if v is None else v - 1 for n, v in fits.items()}
            if all(v == refs for v in fits.values()):
                break
        return fits

    def held_out(self, job: ModelJob) -> np.ndarray:
        """Dataset indices the job's model is handed but will not train on (its source says)."""
        return self.source.held_out(job, self.labels)

    def audit_one(self, defense: DefenseChoice, seed: int, split: PoolSplit, *,
                  out: Path | None = None) -> TargetOutcome:
        """Plan, get the models from the source, query them, run the attacks (with `out`: the
        released models in out/models/DEFENSE/seedS); the target's outcome."""
        self.check_references(defense, seed, split)      # stops before training
        tag = f"{defense.name} seed {seed}"
        if self.progress is not None:
            self.progress.target(f"[{tag}]")
        jobs = self.plan(defense, seed, split)
        run_dir = None if out is None else released_dir(out, defense.name, seed)
        models = self.source.models(jobs, run_dir=run_dir, eval_idx=split.target_nonmembers,
                                    desc=tag)
        ev = evaluation_of(split, models[0], self.canary_idx)
        pool = [m for j, m in zip(jobs, models) if j.role != "shadow"]
        ctx = extract_signals(pool, [m for j, m in zip(jobs, models) if j.role == "shadow"],
                              self.data, split, self.requirements, seed,
                              canaries=self.canary_idx, progress=self.cfg.progress,
                              handed=[j.train_idx for j in jobs if j.role != "shadow"],
                              access=self.source.query_access)
        if run_dir is not None:
            self.source.release(run_dir, jobs, models, ev, ctx)
        on_attack = (None if self.progress is None else
                     lambda i, n, name: self.progress.attack(f"[{tag}]", i, n, name))
        attacks = run_attacks(self.attacks, ctx, ev, n_boot=self.cfg.bootstrap,
                              unpooled=self.unpooled(defense), on_attack=on_attack)
        if run_dir is not None and self.canaries is not None:
            write_canary_members(run_dir, jobs, ctx.target.member, ev)
        return self.outcome(defense, seed, split, models[0], ev, ctx, attacks)

    def outcome(self, defense: DefenseChoice, seed: int, split: PoolSplit,
                target: TrainedModel, ev: Evaluation, ctx: AttackContext,
                attacks: dict[str, AttackOutcome]) -> TargetOutcome:
        """The target's outcome: accuracies (asked of the target's queries), the attacks, the
        canary rows and epsilon bound, exposure (image data) and the models each attack used."""
        about, n_boot = self.source.describe(defense, target), self.cfg.bootstrap
        member, held = ctx.target.member, ctx.target.held_out
        test_acc = target.queries.accuracy(split.target_nonmembers)
        warning = chance_warning(test_acc, self.labels[split.target_nonmembers],
                                 self.data.num_classes)
        return TargetOutcome(
            dataset=self.data.name, model=about["model"], defense=defense.name,
            params=about["params"], seed=seed, test_acc=test_acc,
            train_acc=target.queries.accuracy(ev.sample_idx[ev.members]), evaluation=ev,
            labels=ctx.target.labels, margins=margins(ctx.target.logits[0], ctx.target.labels),
            attacks=attacks, defense_report=about["defense_report"], chance_warning=warning,
            model_member=member, model_held_out=held,
            canaries=self.canary_row(attacks, member, ev, seed, n_boot, held,
                                     about["claimed_epsilon"]),
            exposure=(exposure_of(attacks, member, self.data, ev.sample_idx, held_out=held)
                      if self.source.images else None),
            models_used=models_used(self.attacks, attacks, ctx, self.source.trained_by))

    def canary_row(self, attacks: dict, member: np.ndarray, ev: Evaluation, seed: int,
                   n_boot: int, held: np.ndarray | None = None,
                   claimed_epsilon: float | None = None) -> dict[str, Any] | None:
        """{"n", "kind", "attacks": {name: metrics on the canaries alone}}
        (crl.audit.canary_metrics), and "epsilon_lower_bound" (crl.audit.epsilon.canary_epsilon)
        when its attack ran."""
        if self.canaries is None:
            return None
        metrics = subset_metrics(attacks, member, ev.sample_idx, ev.canary, n_boot=n_boot,
                                 seed=seed, held_out=held)
        row = {"n": self.canaries.n, "kind": self.canaries.kind, "attacks": metrics}
        name = epsilon_attack_name(self.cfg.epsilon_attack, list(attacks))
        if name is not None:   # crl.audit.epsilon; docs/attacks.md "Empirical epsilon"
            # canaries the target's defense held out of training are neither in nor out
            a, c = attacks[name], ev.canary if held is None else ev.canary & ~held[0]
            row["epsilon_lower_bound"] = canary_epsilon(
                name, a.scores[c], member[0, c], None if a.pooled is None else a.pooled[:, c],
                member[:, c], delta=self.cfg.epsilon_delta, claimed_epsilon=claimed_epsilon,
                seed=seed_for(seed, "epsilon"))
        return row


def released_dir(out: Path, defense: str, seed: int) -> Path:
    return Path(out) / "models" / defense / f"seed{seed}"


def split_of(labels: np.ndarray, seed: int, subset: int | None) -> PoolSplit:
    """The pool split of run seed `seed` (its own named stream)."""
    return make_pool_split(labels, seed=seed_for(seed, "split"), subset=subset)


def canaries_for(cfg: AuditConfig, data: ImageData) -> tuple[ImageData, CanarySet | None]:
    """With --canaries: the dataset followed by its canaries, which (when mislabeled) copy
    samples outside every seed's target and shadow pools; else (data, None). Data with its own
    `with_canaries` (the caller's, crl.commands.audit_training.UserData) joins them itself."""
    if not cfg.canaries:
        return data, None
    n, kind = parse_canaries(cfg.canaries)
    labels = data.y.cpu().numpy()
    used = [np.concatenate([s.target_pool, s.shadow_pool])
            for s in (split_of(labels, seed, cfg.subset) for seed in cfg.seeds)]
    canaries = make_canaries(data, n, kind, np.concatenate(used))
    # data of the caller's own (crl.commands.audit_training) joins its canaries itself
    join = getattr(data, "with_canaries", None)
    return (with_canaries(data, canaries) if join is None else join(canaries)), canaries


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


def prepare(cfg: AuditConfig) -> tuple[AuditConfig, Audit, dict[int, PoolSplit]]:
    """Every check that can fail, before anything is written: config, names, data, splits,
    the defenses' recipe checks, the device."""
    from crl.core.utils import resolve_device
    from crl.data.datasets import load_dataset
    from crl.data.limits import check_reference_scores
    from crl.rundir import check_out_dir

    cfg = cfg.resolved()
    check_out_dir(cfg.out)
    for w in validate_names(cfg):
        print(f"crl: warning: {w}", file=sys.stderr)
    resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, data_root=cfg.data_root, download=cfg.download)
    audit = Audit(cfg, data)
    splits = {s: audit.split(s) for s in cfg.seeds}
    check_reference_scores(cfg.references, len(audit.data), audit.data.num_classes)
    for d in cfg.defenses:
        audit.check(DefenseChoice(d, cfg.set.get(d, {})), splits[cfg.seeds[0]])
    return cfg, audit, splits


#: writes report.md, verdict.json and the figures of a run directory; returns the AUC table
ReportWriter = Callable[[Path, list[TargetOutcome], AuditConfig], str]


def run_audit(cfg: AuditConfig, *, write_report: ReportWriter,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole audit; returns {'rows', 'outcomes', 'out'}. Writes results atomically, in a
    locked run directory that holds this run alone (crl.rundir.RunDir); its manifest last.
    The report is the caller's `write_report` (crl.commands.audit passes crl.report's)."""
    from crl.rundir import RunDir

    cfg = cfg.resolved()
    run = RunDir(cfg.out, "audit", cfg.to_dict(), resume=cfg.resume, overwrite=cfg.overwrite)
    run.check()          # another run in --out is refused before any data is loaded
    cfg, audit, splits = prepare(cfg)
    out = Path(cfg.out)
    with run.claim():
        write_inputs(out, cfg, splits, audit.canaries)
        t0 = time.time()
        choices = [DefenseChoice(d, cfg.set.get(d, {})) for d in cfg.defenses]
        outcomes = audit_targets(audit, choices, splits, out, echo=echo,
                                 warn=lambda text: echo(f"WARNING {text}"))
        table = write_results(run, outcomes, cfg, write_report)
    echo(table)
    echo(f"wrote {out}/results.json, verdict.json, report.md and figures/ in "
         f"{time.time() - t0:.0f} s")
    echo_verdict(out, echo)
    return {"rows": [o.row() for o in outcomes], "outcomes": outcomes, "out": out}


def write_inputs(out: Path, cfg: AuditConfig, splits: dict[int, PoolSplit],
                 canaries: CanarySet | None) -> None:
    """config.yaml, version.json, splits/seed*.json and the canaries of a run directory."""
    write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_json_atomic(out / "version.json", code_version())
    for s, split in splits.items():
        write_json_atomic(out / "splits" / f"seed{s}.json", split.to_dict())
    if canaries is not None:
        save_canaries(out, canaries)


def audit_targets(audit: Audit, choices: list[DefenseChoice], splits: dict[int, PoolSplit],
                  out: Path | None, *, echo: Callable[[str], None],
                  warn: Callable[[str], None]) -> list[TargetOutcome]:
    """Every (defense, seed) in turn, with the audit's progress line; `warn` gets the chance
    warning of a target at chance."""
    finish_progress = follow_progress(audit, choices, splits)
    outcomes = []
    for d in choices:
        for s, split in splits.items():
            echo(f"[{d.name} seed {s}] training and attacking ...")
            o = audit.audit_one(d, s, split, out=out)
            if o.chance_warning:
                warn(f"[{d.name} seed {s}]: {o.chance_warning}")
            outcomes.append(o)
    finish_progress()
    return outcomes


def write_results(run: Any, outcomes: list[TargetOutcome], cfg: AuditConfig,
                  write_report: ReportWriter, config: dict[str, Any] | None = None) -> str:
    """scores/, the report (the caller's `write_report`), results.json and, last, the
    manifest (crl.rundir.RunDir.finish, with `config` when the run filled in derived keys);
    the AUC table."""
    for o in outcomes:
        save_outcome(run.out / "scores", o)
    table = write_report(run.out, outcomes, cfg)
    write_json_atomic(run.out / "results.json", [o.row() for o in outcomes])
    run.finish(config)
    return table


def follow_progress(audit: Audit, choices: list[DefenseChoice], splits: dict[int, PoolSplit]
                    ) -> Callable[[], None]:
    """Start the audit's overall progress line over every planned model (none with --quiet);
    returns the function that ends it."""
    if not audit.cfg.progress:
        return lambda: None
    total = sum(len(audit.plan(d, s, split)) for d in choices for s, split in splits.items())
    progress = AuditProgress(total)
    audit.follow(progress)
    return progress.close


def echo_verdict(out: Path, echo: Callable[[str], None] = print) -> None:
    """The verdict that write_report put in out/verdict.json, lines of <= 100 characters."""
    import json

    from crl.audit.verdict import console_lines

    for line in console_lines(json.loads((Path(out) / "verdict.json").read_text())):
        echo(line)
