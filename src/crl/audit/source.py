"""Stage 2, the model source: where the audit's models come from and how it may query them.

The audit (crl.audit.pipeline.Audit) plans its models (crl.audit.plan), asks a source for them and
from then on asks each model only through its query interface (`TrainedModel.queries`, a
crl.models.query.SampleQueries; label-only attacks get crl.models.query.QueryAccess). Two
sources exist:

    FactorySource   crl's own training (crl.audit.factory.ModelFactory: engines, verified
                    cache), as `crl audit` and `crl tune` use it; models keep their 63-bit seeds
    TrainFnSource   the caller's `train_fn(x_train, y_train, seed)`
                    (crl.commands.audit_training), as
                    `crl.audit_training` uses it; seeds handed to user code fit in 32 bits

Everything after the source (signals, attacks, pooled rows, canaries, the epsilon bound, the
run directory and the report) is the same code for both.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from crl.attacks.base import AttackContext
from crl.audit.factory import ModelFactory, TrainedModel
from crl.audit.outcome import Evaluation
from crl.audit.plan import DefenseChoice, ModelJob
from crl.core.utils import write_json_atomic
from crl.data.types import ImageData, normalize
from crl.engine.fit import write_metrics
from crl.models.query import QueryAccess, SampleQueries


def image_queries(model: Any, data: ImageData) -> SampleQueries:
    """Query access to one of crl's models on `data`: its images, normalised."""
    return SampleQueries(
        model, lambda b, device: normalize(data.x[b].to(device), data.mean, data.std),
        data.y, data.num_classes)


def members_of(ev: Evaluation, trained_on: np.ndarray) -> dict[str, list[int]]:
    """members.json: every sample the released model trained on: "members" (the evaluated
    ones) and, with canaries, "canaries" (the canaries it trained on, scored on their own);
    "canaries_not_trained_on" are the pool's other canaries; groups by name."""
    members = {"members": ev.sample_idx[ev.members].tolist(),
               "nonmembers": ev.sample_idx[ev.nonmembers].tolist()}
    members.update({k: ev.sample_idx[m].tolist() for k, m in ev.groups.items()})
    if ev.canary is not None and ev.canary.any():
        trained = np.isin(ev.sample_idx, trained_on)
        members["canaries"] = ev.sample_idx[ev.canary & trained].tolist()
        members["canaries_not_trained_on"] = ev.sample_idx[ev.canary & ~trained].tolist()
    return members


def write_released(run_dir: Path, factory: ModelFactory, target: TrainedModel,
                   ev: Evaluation) -> None:
    """model.pt, metrics.jsonl and members.json (`members_of`): every number is recomputable
    from these."""
    factory.save(run_dir / "model.pt", target)
    write_metrics(run_dir / "metrics.jsonl", target.history)
    write_json_atomic(run_dir / "members.json", members_of(ev, target.trained_on))


def write_model_index(run_dir: Path, jobs: list[ModelJob], models: list[TrainedModel]) -> None:
    """models.json: every model behind this target's numbers (the target, its reference and
    shadow models) with its seed, defense, the arithmetic that trained it and the model-cache
    entry that holds it (file name and sha256; null with --no-cache). The run's manifest
    checksums this file, so it names the cache entries the run's numbers come from."""
    write_json_atomic(run_dir / "models.json", [
        {"role": j.role, "index": j.index, "seed": j.seed, "defense": j.defense.name,
         "arithmetic": m.report.get("arithmetic"), "from_cache": m.from_cache,
         "cache_entry": m.cache_entry} for j, m in zip(jobs, models)])


class ModelSource:
    """What the audit asks of whoever trains its models (a base: `models` is abstract).

    trained_by: how the models were trained, for the report (e.g. '2 epochs, batch 128, lr
    0.1'); label_queries: whether label-only attacks may query the models (QueryAccess);
    images: whether the data are images the report can show (the most exposed samples)."""

    trained_by: str = ""
    label_queries: bool = False
    images: bool = False

    def check(self, jobs: list[ModelJob]) -> None:
        """Checks of the planned models that can fail before any training."""

    def held_out(self, job: ModelJob, labels: np.ndarray) -> np.ndarray:
        """Dataset indices the job's model is handed but will not train on (none here)."""
        return np.zeros(0, np.int64)

    def follow(self, on_model: Callable[[], None]) -> None:
        """Call `on_model` once for every model served or trained (progress)."""

    def models(self, jobs: list[ModelJob], *, run_dir: Path | None, eval_idx: np.ndarray,
               desc: str) -> list[TrainedModel]:
        """The trained models of `jobs`, in order, each with its `queries`."""
        raise NotImplementedError

    def describe(self, defense: DefenseChoice, target: TrainedModel) -> dict[str, Any]:
        """The outcome's {'model', 'params', 'defense_report', 'claimed_epsilon'}."""
        raise NotImplementedError

    def release(self, run_dir: Path, jobs: list[ModelJob], models: list[TrainedModel],
                ev: Evaluation, signals: AttackContext) -> None:
        """Write the released models of one target and members.json into `run_dir`."""
        raise NotImplementedError

    def query_access(self, pool_models: list[TrainedModel], pool: np.ndarray,
                     shadow_models: list[TrainedModel], shadow_pool: np.ndarray, *,
                     progress: bool) -> QueryAccess:
        from crl.core.errors import CRLError

        raise CRLError("attacks that query models on inputs they build (requirement 'oracle') "
                       "need crl's own image models: expected them with crl audit")


class FactorySource(ModelSource):
    """crl's own models: trained by the engines through the verified cache (ModelFactory)."""

    label_queries = True
    images = True

    def __init__(self, factory: Any, arch: str) -> None:
        self.factory, self.data, self.arch = factory, factory.data, arch
        r = factory.recipe
        self.trained_by = (f"Models trained by crl: {r.epochs} epochs, batch {r.batch_size}, "
                           f"lr {r.lr}")

    def check(self, jobs: list[ModelJob]) -> None:
        from crl.defenses.base import build_defense

        for job in jobs:
            build_defense(job.defense.name, job.defense.params).check(self.factory.recipe,
                                                                      len(job.train_idx))

    def held_out(self, job: ModelJob, labels: np.ndarray) -> np.ndarray:
        from crl.defenses.base import build_defense

        handed = np.sort(np.asarray(job.train_idx, np.int64))
        return build_defense(job.defense.name, job.defense.params).held_out(handed, labels,
                                                                            job.seed)

    def follow(self, on_model: Callable[[], None]) -> None:
        from crl.audit.progress import CountingCache

        self.factory.cache = CountingCache(self.factory.cache, on_model)

    def models(self, jobs: list[ModelJob], *, run_dir: Path | None, eval_idx: np.ndarray,
               desc: str) -> list[TrainedModel]:
        """The target (checkpointed in run_dir, test accuracy logged) and every other model,
        through the factory (cache first)."""
        models = self.factory.get_many(jobs, run_dirs={0: run_dir} if run_dir else None,
                                       eval_idx=eval_idx, desc=f"[{desc}]")
        for m in models:
            m.queries = image_queries(m.model, self.data)
        return models

    def describe(self, defense: DefenseChoice, target: TrainedModel) -> dict[str, Any]:
        from crl.defenses.base import build_defense

        return {"model": self.arch, "defense_report": target.report,
                "params": build_defense(defense.name, defense.params).params,
                "claimed_epsilon": target.report.get("epsilon")}

    def release(self, run_dir: Path, jobs: list[ModelJob], models: list[TrainedModel],
                ev: Evaluation, signals: AttackContext) -> None:
        """model.pt, metrics.jsonl, members.json and models.json."""
        write_released(run_dir, self.factory, models[0], ev)
        write_model_index(run_dir, jobs, models)

    def query_access(self, pool_models: list[TrainedModel], pool: np.ndarray,
                     shadow_models: list[TrainedModel], shadow_pool: np.ndarray, *,
                     progress: bool) -> QueryAccess:
        """The pool's images and an oracle per pool model, and the shadow pool's images and
        shadow models when there are any."""
        data = self.data
        return QueryAccess(images=data.x[np.asarray(pool, np.int64)],
                           models=[m.model for m in pool_models], mean=data.mean, std=data.std,
                           progress=progress, shadow_models=[m.model for m in shadow_models],
                           shadow_images=(data.x[np.asarray(shadow_pool, np.int64)]
                                          if shadow_models else None))
