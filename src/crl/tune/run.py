"""`run_tune`: the whole `crl tune` command.

1. Check everything before any training: both stages' configs (crl.audit.pipeline.prepare), the
   search space, and that the objective's FPR level is resolvable.
2. In the locked run directory, continue the study until --trials trials count; each trial
   audits DefenseChoice(defense, sampled parameters) on every search seed (Audit.audit_one;
   the model cache makes repeated settings free).
3. Audit CE, the defense at its defaults and every --compare defense on the search seeds
   (reference points), take the most private trial within --max-accuracy-drop of CE's test
   accuracy, and re-run it, CE and the defaults on fresh seeds with the confirm attacks (test
   accuracy with its interval; changes against CE paired, by crl.audit.verdict's functions).
4. Write tune.json, tune.md and pareto.png, then manifest.json (crl.core.manifest; the setup is
   the run's config: another setup in OUT is refused unless --overwrite), and print the
   outcome: "recommended" only when the trial beats CE beyond noise (crl.tune.output.status),
   else "no setting beats ce within the budget" and why.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import optuna
from optuna.trial import TrialState

from crl.audit import Audit, DefenseChoice
from crl.audit.pipeline import prepare
from crl.audit.verdict import (
    accuracy_text,
    change_text,
    paired_accuracy_change,
    strongest_change,
    wrap,
)
from crl.config import AuditConfig
from crl.core.seeding import numpy_rng, seed_for
from crl.core.utils import code_version
from crl.data.splits import PoolSplit
from crl.defenses.base import build_defense
from crl.rundir import RunDir
from crl.tune.evaluate import Point, check_resolvable, evaluate_setting, objective_interval
from crl.tune.options import OBJECTIVES, TuneOptions, stage_configs
from crl.tune.output import RECOMMENDED, ConfirmRow, TuneResult, fmt, status, write_outputs
from crl.tune.space import search_space
from crl.tune.study import (
    Search,
    completed_points,
    first_difference,
    open_study,
    recommend,
    run_trials,
    setup_of,
    study_seconds,
)


def run_tune(cfg: AuditConfig, opts: TuneOptions, *, command: str = "",
             echo: Callable[[str], None] = print) -> TuneResult:
    """Search `opts.defense` with the recipe `cfg`; writes into cfg.out and returns the result."""
    opts = opts.checked()
    search_cfg, confirm_cfg, warnings = stage_configs(cfg.resolved(), opts)
    for w in warnings:
        print(f"crl: warning: {w}", file=sys.stderr)
    search_cfg, audit, splits = prepare(search_cfg)
    metric = OBJECTIVES[opts.objective]
    fixed = search_cfg.set.get(opts.defense, {})
    search = Search(audit, splits, opts.defense, fixed, search_space(opts.defense, fixed), metric)
    _, confirm_audit, confirm_splits = prepare(confirm_cfg)
    for a, s in ((audit, splits), (confirm_audit, confirm_splits)):
        check_resolvable(a, s[a.cfg.seeds[0]], opts.objective, metric)
    out = Path(search_cfg.out)
    setup = tune_setup(search_cfg, opts, audit)
    run = RunDir(out, "tune", setup, resume=True, overwrite=search_cfg.overwrite,
                 differ=first_difference)
    run.check()
    with run.claim():
        result = _tune_locked(out, search, opts, (confirm_audit, confirm_splits), command, echo,
                              setup)
        run.finish()
    for line in summary(result, out):
        echo(line)
    return result


def tune_setup(cfg: AuditConfig, opts: TuneOptions, audit: Audit) -> dict:
    """The study's setup (crl.tune.study.setup_of), without --overwrite (how this run treats
    OUT, not what its trials computed)."""
    setup = setup_of(cfg, opts, audit.data)
    setup["recipe"].pop("overwrite", None)
    return setup


def _tune_locked(out: Path, search: Search, opts: TuneOptions,
                 confirm: tuple[Audit, dict[int, PoolSplit]], command: str,
                 echo: Callable[[str], None], setup: dict) -> TuneResult:
    t0 = time.time()
    study = open_study(out, setup, run_seed=search.seeds[0])
    before = study_seconds(study)          # earlier runs, finished or killed after a trial
    run_trials(study, search, opts.trials, echo)
    echo("reference points (search seeds) ...")
    refs = reference_points(search, opts.compare)
    rec = recommend(completed_points(study), refs["ce"], opts.max_accuracy_drop)
    rows = []
    if rec is not None:
        echo(f"re-running the recommendation on fresh seeds {confirm[0].cfg.seeds} ...")
        rows = confirm_rows(*confirm, search, rec)
    run_seconds = time.time() - t0
    study.set_user_attr("seconds", before + run_seconds)
    meta = {"command": command, "setup": setup, "version": code_version(),
            "machine": machine(), "date": str(date.today()),
            "seconds": {"run": round(run_seconds), "total": round(before + run_seconds)}}
    result = TuneResult(meta, search.metric, list(search.space), list(search.audit.cfg.attacks),
                        trial_rows(study), [t.number for t in study.best_trials], refs,
                        opts.max_accuracy_drop, rec, rows, list(confirm[0].cfg.seeds),
                        list(confirm[0].cfg.attacks))
    write_outputs(out, result)
    return result


def reference_points(search: Search, compare: list[str]) -> dict[str, Point]:
    """CE, the searched defense (its defaults, --set values kept) and every --compare defense,
    audited on the search seeds."""
    sets = search.audit.cfg.set
    choices = {"ce": DefenseChoice("ce"), search.defense: search.choice({})}
    choices.update({c: DefenseChoice(c, sets.get(c, {})) for c in compare if c not in choices})
    return {label: evaluate_setting(search.audit, search.splits, choice, search.seeds,
                                    search.metric)[0] for label, choice in choices.items()}


def confirm_rows(audit: Audit, splits: dict[int, PoolSplit], search: Search,
                 rec: tuple[int, Point]) -> list[ConfirmRow]:
    """CE, the recommended trial and the defense's defaults (when they differ) on the confirm
    stage's fresh seeds and attacks, each with the 95% interval of its strongest attack."""
    number, point = rec
    defaults = search.choice({})
    choices = {"ce": DefenseChoice("ce"),
               f"{search.defense} (trial {number})": DefenseChoice(search.defense, point.params)}
    if build_defense(defaults.name, defaults.params).params != point.params:
        choices[f"{search.defense} (defaults)"] = defaults
    seeds, n_boot = list(audit.cfg.seeds), audit.cfg.bootstrap
    rows, ce = [], None
    for label, choice in choices.items():
        p, outcomes = evaluate_setting(audit, splits, choice, seeds, search.metric)
        stream = seed_for(seeds[0], "tune", "interval", label)
        row = ConfirmRow(label, p, objective_interval(p, outcomes, search.metric, n_boot=n_boot,
                                                      seed=stream),
                         accuracy_interval(outcomes, n_boot=n_boot, seed=stream))
        if ce is None:
            ce = outcomes
        else:                           # paired with CE on the same fresh seeds and samples
            pairs = list(zip(outcomes, ce))
            row.change = strongest_change(pairs, search.metric, n_boot=n_boot, seed=stream)
            row.accuracy_change = paired_accuracy_change(pairs, n_boot=n_boot, seed=stream)
        rows.append(row)
    return rows


def accuracy_interval(outcomes: list, *, n_boot: int, seed: int) -> list[float]:
    """95% interval of the test accuracy averaged over seeds: a bootstrap over each seed's test
    samples (a prediction is right when its logit margin is above 0)."""
    import numpy as np

    rng = numpy_rng(seed, "tune", "accuracy")
    reps = []
    for o in outcomes:
        right = (np.asarray(o.margins)[o.evaluation.nonmembers] > 0).astype(float)
        reps.append(right[rng.integers(0, len(right), size=(n_boot, len(right)))].mean(1))
    lo, hi = np.percentile(np.mean(reps, axis=0), [2.5, 97.5])
    return [float(lo), float(hi)]


def trial_rows(study: optuna.Study) -> list[dict]:
    """Every trial of the study as stored (a FAIL without a reason was left by a killed run)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        point = t.user_attrs.get("point")
        failed = t.user_attrs.get("failed")
        if t.state == TrialState.FAIL and failed is None:
            failed = "interrupted (the run was killed): no result"
        rows.append({"number": t.number, "state": t.state.name, "searched": dict(t.params),
                     "values": t.values, "failed": failed, "point": point})
    return rows


def confirm_line(r: TuneResult, row: ConfirmRow) -> list[str]:
    """One fresh-seed row on the console: test accuracy and the strongest attack, each with its
    95% interval, and the paired changes against CE."""
    q, lo_hi = row.point, row.accuracy_interval
    text = (f"fresh seeds {q.seeds}, {row.label}: test {100 * q.test_acc:.1f}%"
            + (f" [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]" if lo_hi else "")
            + f", strongest {q.strongest} {fmt(r.metric, q.objective)}"
            + (f" [{fmt(r.metric, row.interval[0])}, {fmt(r.metric, row.interval[1])}]"
               if row.interval else ""))
    if row.change is not None and row.accuracy_change is not None:
        text += f"; vs CE: {change_text(row.change)}, {accuracy_text(row.accuracy_change)}"
    return wrap(text, indent="  ")


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {gpu}"


def summary(r: TuneResult, out: Path) -> list[str]:
    """The console lines: the recommendation with both its search and fresh-seed numbers."""
    defense = r.meta["setup"]["defense"]
    lines = [(f"{len(r.trials)} trials ({len(r.points())} completed), "
              f"{len(r.front)} on the Pareto front")]
    state, words = status(r)
    lines += wrap(words, indent="")
    if r.recommended is not None:
        n, p = r.recommended
        name = "recommended" if state == RECOMMENDED else "most private within the budget"
        lines.append(f"{name} (trial {n}): --set " + " --set ".join(
            f"{defense}.{k}={p.params[k]:.4g}" for k in r.searched))
        ce = r.references["ce"]
        lines.append(f"  search seeds {p.seeds} (optimistic): test {100 * p.test_acc:.1f}%, "
                     f"strongest {p.strongest} {fmt(r.metric, p.objective)} (CE: test "
                     f"{100 * ce.test_acc:.1f}%, {ce.strongest} {fmt(r.metric, ce.objective)})")
        for row in r.confirm:
            lines += confirm_line(r, row)
    lines.append(f"wrote {out}/tune.json, tune.md and pareto.png")
    return lines
