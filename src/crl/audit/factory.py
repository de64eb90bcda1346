"""Stage 2, the model factory: a planned model is fetched from the cache (verified) or trained,
then saved. Cache keys cover everything that shapes the weights: the code (package version and a
hash of the package source), the dataset's content hash, the model spec, the defense and its
parameters, the recipe (the model's seed included), the exact training indices and the
arithmetic that trains it (crl.engine.arithmetic_label: the engine's formulation and the device
class). Engines give the same distribution of models, not the same model (crl.engine), so an
entry the ensemble trained never serves a run whose engine would train the model sequentially,
nor the reverse. The engine plans each model's arithmetic over its whole group (every model of
one defense, cached or not: `ModelFactory.plan`), so the plan does not depend on what the cache
holds; a model that trained otherwise (a stack that failed at the start of its chunk, a Ray
worker on another device) is stored under the arithmetic its report names.

Every entry is a checksummed model file that also stores its full key; an entry that fails its
checksum or whose stored key differs from the request is retrained with a warning.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from crl.audit.plan import ModelJob
from crl.core.errors import CRLError
from crl.core.integrity import file_digest
from crl.core.utils import code_hash, jsonable
from crl.data.types import ImageData
from crl.defenses.base import build_defense
from crl.engine import TrainOutput, TrainRequest, get_engine
from crl.engine.fit import check_diverged
from crl.models.io import load_model_file, released_extra, save_model
from crl.models.spec import ModelSpec
from crl.training.fingerprints import data_identity, indices_digest
from crl.training.recipe import Recipe


@dataclass
class TrainedModel:
    model: nn.Module              # raw network (expects normalised inputs), eval mode
    spec: ModelSpec
    trained_on: np.ndarray        # dataset indices the model actually trained on
    report: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    from_cache: bool = False
    cache_entry: dict[str, Any] | None = None   # {"entry", "sha256", "size"} of its cache file
    queries: Any = None           # crl.models.query.SampleQueries, set by the model source


class ModelCache:
    """Verified model files under `root` (None: caching off)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        if root is not None:
            remove_stale_tmp(root)

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: dict[str, Any]) -> Path | None:
        return None if self.root is None else self.root / f"{self.digest(key)}.pt"

    def get(self, key: dict[str, Any]) -> TrainedModel | None:
        path = self.path(key)
        if path is None or not path.exists():
            return None
        try:
            net, spec, extra = load_model_file(path)
            if extra.get("key") != key:
                raise CRLError(f"cache entry {path} was stored for another key")
            return _from_extra(net, spec, extra, from_cache=True)
        except CRLError as e:
            print(f"crl: warning: ignoring a bad model-cache entry, retraining: {e}",
                  file=sys.stderr)
            return None

    def put(self, key: dict[str, Any], trained: TrainedModel) -> None:
        if self.root is not None:
            save_model(self.path(key), trained.model, trained.spec,
                       extra={"key": key, **_extra(trained)})

    def entry(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cache file of `key` by name and checksum (None: caching off or no such file):
        what a run directory records so that its numbers can be traced to the models."""
        path = self.path(key)
        if path is None or not path.exists():
            return None
        return {"entry": path.name, **file_digest(path)}


#: a temporary entry untouched this long was left by a killed process (a write in progress
#: touches its file every few seconds)
STALE_TMP_SECONDS = 30 * 60


def remove_stale_tmp(root: Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove the `.*.tmp` files (crl.core.utils.atomic_path's) in the cache folder `root` not
    modified for `max_age` seconds; returns them. Younger ones may be another process's write."""
    removed = []
    try:
        for path in root.glob(".*.tmp"):
            try:
                if path.is_file() and time.time() - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue   # gone already, or not ours to remove
    except OSError:
        pass
    return removed


def _extra(t: TrainedModel) -> dict[str, Any]:
    return {"trained_on": t.trained_on.tolist(), "report": t.report, "history": t.history,
            "groups": {k: np.asarray(v).tolist() for k, v in t.groups.items()}}


def _from_extra(net, spec, extra, from_cache: bool) -> TrainedModel:
    return TrainedModel(net.eval(), spec, np.asarray(extra["trained_on"], dtype=np.int64),
                        extra.get("report", {}), extra.get("history", []),
                        {k: np.asarray(v, dtype=np.int64)
                         for k, v in extra.get("groups", {}).items()}, from_cache)


def _by_defense(jobs: list[ModelJob]) -> list[list[int]]:
    """Job positions grouped by defense and (resolved) parameters, in order."""
    groups: dict[str, list[int]] = {}
    for i, job in enumerate(jobs):
        defense = build_defense(job.defense.name, job.defense.params)
        name = defense.name + json.dumps(jsonable(defense.params), sort_keys=True)
        groups.setdefault(name, []).append(i)
    return list(groups.values())


class ModelFactory:
    """Train-or-fetch for one dataset, architecture and recipe."""

    def __init__(self, data: ImageData, arch: str, recipe: Recipe, cache: ModelCache, *,
                 resume: bool = False, progress: bool = True, engine: str = "sequential",
                 engine_options: dict[str, Any] | None = None) -> None:
        self.data, self.recipe, self.cache = data, recipe, cache
        self.spec = ModelSpec.for_data(arch, data)
        self.resume, self.progress = resume, progress
        self.engine = get_engine(engine, **(engine_options or {}))

    def key(self, job: ModelJob, recipe: Recipe, arithmetic: str | None = None
            ) -> dict[str, Any]:
        """The cache key of `job` trained with `recipe` and `arithmetic` (default: what this
        factory's engine plans for the job alone)."""
        arithmetic = arithmetic or self.plan([job], [self.request(job, None, None, "")])[0]
        defense = build_defense(job.defense.name, job.defense.params)
        return jsonable({
            "code": code_hash(), "data": data_identity(self.data), "spec": self.spec.to_dict(),
            "defense": defense.name, "params": defense.params, "recipe": recipe.weights_key(),
            "train": indices_digest(np.sort(job.train_idx)), "n_train": len(job.train_idx),
            "arithmetic": arithmetic,
        })

    def plan(self, jobs: list[ModelJob], requests: list[TrainRequest]) -> list[str]:
        """Each job's arithmetic, planned by the engine over its whole group (one defense and
        parameters), cached or not, and set on its request (the engine honours it)."""
        planned = [""] * len(jobs)
        for members in _by_defense(jobs):
            job = jobs[members[0]]
            labels = self.engine.plan(self.spec, self.data, self.recipe, job.defense.name,
                                      [requests[i] for i in members], resume=self.resume)
            for i, label in zip(members, labels):
                planned[i] = requests[i].arithmetic = label
        return planned

    def recipe_of(self, job: ModelJob) -> Recipe:
        return replace(self.recipe, seed=job.seed)

    def get(self, job: ModelJob, *, run_dir: Path | None = None, eval_idx=None,
            desc: str = "") -> TrainedModel:
        """The trained model of `job`: from the cache when a verified entry exists."""
        return self.get_many([job], run_dirs={0: run_dir} if run_dir else None,
                             eval_idx=eval_idx, desc=desc)[0]

    def get_many(self, jobs: list[ModelJob], *, run_dirs: dict[int, Path] | None = None,
                 eval_idx=None, desc: str = "") -> list[TrainedModel]:
        """The trained models of `jobs`, in order: verified cache entries are served, the rest
        are trained by the engine, one group per defense, and cached as each finishes.
        run_dirs: job position -> folder for its checkpoint and metrics; eval_idx: indices
        whose accuracy is logged per epoch for the target (monitoring only)."""
        requests = [self.request(job, (run_dirs or {}).get(i), eval_idx, desc)
                    for i, job in enumerate(jobs)]
        planned = self.plan(jobs, requests)
        keys = [self.key(job, self.recipe_of(job), planned[i]) for i, job in enumerate(jobs)]
        out: list[TrainedModel | None] = [self.cache.get(k) for k in keys]
        for i, t in enumerate(out):
            if t is not None:
                t.cache_entry = self.cache.entry(keys[i])
        for group in _by_defense(jobs):
            missing = [i for i in group if out[i] is None]
            if not missing:
                continue

            def done(k: int, output: TrainOutput, missing=missing) -> None:
                i = missing[k]
                check_diverged(output.net, self.data, output.trained_on, len(output.history),
                               jobs[i].defense.name, requests[i].desc)
                out[i] = TrainedModel(output.net, output.spec, output.trained_on,
                                      output.report, output.history, output.groups)
                actual = output.report.get("arithmetic", keys[i]["arithmetic"])
                self.cache.put({**keys[i], "arithmetic": actual}, out[i])
                out[i].cache_entry = self.cache.entry({**keys[i], "arithmetic": actual})

            job = jobs[missing[0]]
            self.engine.train(self.spec, self.data, self.recipe, job.defense.name,
                              job.defense.params, [requests[i] for i in missing],
                              resume=self.resume, progress=self.progress, on_done=done)
        return out  # type: ignore[return-value]

    @staticmethod
    def request(job: ModelJob, run_dir: Path | None, eval_idx, desc: str) -> TrainRequest:
        return TrainRequest(seed=job.seed, train_idx=np.sort(job.train_idx),
                            eval_idx=eval_idx if job.role == "target" else None,
                            run_dir=run_dir, desc=f"{desc} {job.label}".strip())

    def save(self, path: Path, trained: TrainedModel) -> None:
        """The released model file of a run directory: weights, spec, class names, expected
        input, the defense's report and history; never the training indices (the caller writes
        them beside it: split.json / members.json)."""
        save_model(path, trained.model, trained.spec,
                   extra=released_extra(trained.spec, self.data.classes, report=trained.report,
                                        history=trained.history))
