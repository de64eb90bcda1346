"""The study: Optuna, two objectives (maximise test accuracy, minimise the strongest attack's
metric), stored in the run directory (SQLite file STUDY_FILE, study STUDY_NAME).

The study keeps its setup (defense, objective, data, recipe) and refuses a rerun with another
one. `--trials N` is the total: N counts the trials that finished (completed, or failed because
the target collapsed to chance or a CRLError); a trial left running by a killed process is
marked failed, without a reason, on the next run and not counted. Multi-objective studies have
no pruner: a collapsed trial is told FAIL with its reason in the user attribute "failed".
The TPE sampler is seeded from the run seed's stream ("tune", "sampler", trials so far), so a
continued study draws new random numbers rather than replaying the first run's.
"""
from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from crl.audit import Audit, DefenseChoice
from crl.config import FIELD_SPECS, AuditConfig
from crl.core.errors import CRLError
from crl.core.seeding import numpy_rng
from crl.data.splits import PoolSplit
from crl.data.types import ImageData
from crl.rundir import first_difference as config_difference
from crl.rundir import flatten_config
from crl.training.fingerprints import data_identity
from crl.tune.evaluate import Point, evaluate_setting
from crl.tune.options import TuneOptions

STUDY_FILE, STUDY_NAME = "study.db", "crl-tune"
DIRECTIONS = ["maximize", "minimize"]
#: AuditConfig fields that do not change any trial's numbers (not part of the setup)
_NOT_SETUP = ("out", "device", "data_root", "download", "resume", "cache", "progress",
              "defenses", "set", "engine", "ensemble_size", "ray_address", "ray_chunk")


@dataclass
class Search:
    """What every trial shares: the audit of the search seeds and the searched defense."""

    audit: Audit
    splits: dict[int, PoolSplit]
    defense: str
    fixed: dict[str, Any]                  # --set values of the defense (not searched)
    space: dict[str, BaseDistribution]
    metric: str

    @property
    def seeds(self) -> list[int]:
        return list(self.audit.cfg.seeds)

    def choice(self, sampled: dict[str, Any]) -> DefenseChoice:
        return DefenseChoice(self.defense, {**self.fixed, **sampled})


def setup_of(cfg: AuditConfig, opts: TuneOptions, data: ImageData) -> dict[str, Any]:
    """What the stored trials depend on: a rerun must match it to continue the study."""
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_SETUP}
    owners = {opts.defense, *cfg.attacks}
    recipe["set"] = {k: v for k, v in cfg.set.items() if k in owners}
    setup = {"defense": opts.defense, "objective": opts.objective, "data": data_identity(data),
             "recipe": recipe}
    return json.loads(json.dumps(setup))


def open_study(out: Path, setup: dict[str, Any], run_seed: int) -> optuna.Study:
    """The run directory's study (created on first use), with a sampler for this run."""
    path = Path(out) / STUDY_FILE
    study, stored = _load_study(path)
    if stored is None:
        study.set_user_attr("setup", setup)
    elif (key := first_difference(stored, setup)) is not None:
        old, new = flatten_config(stored).get(key), flatten_config(setup).get(key)
        raise CRLError(f"{key} = {new!r}: the study in {path} was run with {old!r}; expected "
                       "the same setup to continue it, or another --out")
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)      # left by a killed run
    study.sampler = sampler_for(run_seed, len(study.trials))
    return study


def _load_study(path: Path) -> tuple[optuna.Study, Any]:
    """The study in `path` (created if missing) and its stored setup; an unreadable file (not
    SQLite, truncated, a folder, another schema) is a one-line CRLError naming it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bad = (f"study file {path} is unreadable; expected the SQLite study crl tune writes "
           "(move it away to start a new study, or choose another --out)")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise CRLError(bad.replace("is unreadable", "is not a file", 1))
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path.resolve()}")
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                    directions=DIRECTIONS, load_if_exists=True)
        study.get_trials(deepcopy=False)      # reads every trial: damage shows here
        return study, study.user_attrs.get("setup")
    except (SQLAlchemyError, sqlite3.Error, OSError, ValueError, KeyError) as e:
        cause = str(getattr(e, "orig", None) or e).splitlines()[0]
        raise CRLError(bad.replace("is unreadable", f"is unreadable ({cause})", 1)) from None


def first_difference(stored: dict[str, Any], setup: dict[str, Any]) -> str | None:
    """The first (flattened) key whose value differs, ignoring a recipe field only one side
    has (added to or dropped from AuditConfig by another version) when it is at its default."""
    return config_difference(stored, setup, _at_default)


def _at_default(key: str, value: Any) -> bool:
    spec = FIELD_SPECS.get(key.removeprefix("recipe."))
    return key.startswith("recipe.") and spec is not None and value == spec.default


def sampler_for(run_seed: int, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """TPE seeded from the named stream ("tune", "sampler", trials_so_far) of the run seed."""
    seed = int(numpy_rng(run_seed, "tune", "sampler", trials_so_far).integers(2**32))
    return optuna.samplers.TPESampler(seed=seed)


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward --trials: completed, or failed with a reason."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state == TrialState.COMPLETE
            or (t.state == TrialState.FAIL and "failed" in t.user_attrs)]


def study_seconds(study: optuna.Study) -> float:
    """The wall time the study's runs have spent, as stored in it."""
    return float(study.user_attrs.get("seconds", 0))


def charge_seconds(study: optuna.Study, seconds: float) -> None:
    """Add `seconds` to the study's stored wall time (per trial, so a killed run keeps the
    time of the trials it finished)."""
    study.set_user_attr("seconds", study_seconds(study) + seconds)


def run_trials(study: optuna.Study, search: Search, total: int,
               echo: Callable[[str], None]) -> int:
    """Ask and evaluate trials until `total` count; returns how many ran now."""
    start = len(counted(study))
    for k in range(start, total):
        t0 = time.time()
        trial = study.ask(search.space)
        line = run_trial(study, trial, search)
        charge_seconds(study, time.time() - t0)
        echo(f"trial {trial.number} ({k + 1}/{total}) {line} ({time.time() - t0:.0f} s)")
    return max(0, total - start)


def run_trial(study: optuna.Study, trial: optuna.Trial, search: Search) -> str:
    """Evaluate one trial and tell the study; returns its console line."""
    choice = search.choice(trial.params)
    try:
        point, _ = evaluate_setting(search.audit, search.splits, choice, search.seeds,
                                    search.metric)
    except CRLError as e:
        trial.set_user_attr("failed", f"error: {e}")
        study.tell(trial, state=TrialState.FAIL)
        return f"{format_params(trial.params)}: failed: {e}"
    trial.set_user_attr("point", point.to_dict())
    head = f"{format_params(trial.params)}: test {100 * point.test_acc:.1f}%"
    if point.warnings:
        trial.set_user_attr("failed", f"chance: {point.warnings[0]}")
        study.tell(trial, state=TrialState.FAIL)
        return f"{head}: failed (target at chance)"
    study.tell(trial, [point.test_acc, point.objective])
    return f"{head}, strongest {point.strongest} {search.metric} {point.objective:.3f}"


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in params.items()) or "defaults"


def completed_points(study: optuna.Study) -> list[tuple[int, Point]]:
    """(trial number, Point) of every completed trial."""
    return [(t.number, Point.from_dict(t.user_attrs["point"]))
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def recommend(points: list[tuple[int, Point]], ce: Point,
              max_drop: float) -> tuple[int, Point] | None:
    """The completed trial with the lowest objective among those whose test accuracy is at
    least CE's minus `max_drop` (ties: higher accuracy, then the earlier trial); None if none.
    It lies on the Pareto front: a trial dominating it would meet the constraint too."""
    floor = ce.test_acc - max_drop - 1e-12
    ok = [(n, p) for n, p in points if p.test_acc >= floor]
    return min(ok, key=lambda item: (item[1].objective, -item[1].test_acc, item[0]),
               default=None)
