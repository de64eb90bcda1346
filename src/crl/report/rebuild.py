"""`crl report RUN`: report.md, report.html, figures/ and vulnerability/ of a finished audit run,
rebuilt without training from its config.yaml and the per-target outcomes in RUN/scores/."""
from __future__ import annotations

from pathlib import Path

from crl.audit.outcome import TargetOutcome, load_outcome, outcome_path
from crl.config import AuditConfig, load_yaml_recipe
from crl.errors import CRLError


def _not_a_run(run: Path, why: str) -> CRLError:
    return CRLError(f"report.run = '{run}': expected a finished crl audit run directory ({why})")


def load_run(run: str | Path) -> tuple[AuditConfig, list[TargetOutcome]]:
    """The run's resolved config and its outcomes in the audit's order: defenses as configured,
    then seeds."""
    run = Path(run)
    if not run.is_dir():
        raise _not_a_run(run, "no such directory" if not run.exists() else "not a directory")
    for name in ("config.yaml", "scores"):
        if not (run / name).exists():
            raise _not_a_run(run, f"it has no {name}")
    try:
        cfg = AuditConfig(**load_yaml_recipe(run / "config.yaml")).resolved()
    except CRLError as e:
        raise _not_a_run(run, f"its config.yaml is not an audit's: {e}") from None
    paths = [outcome_path(run / "scores", d, s) for d in cfg.defenses for s in cfg.seeds]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _not_a_run(run, f"{len(missing)} of {len(paths)} score files missing, e.g. "
                              f"{missing[0].relative_to(run)}: an unfinished audit; rerun it "
                              "with --resume")
    return cfg, [load_outcome(p) for p in paths]


def rebuild_report(run: str | Path) -> str:
    """Rewrite the run's report files from its saved outcomes; returns the AUC table."""
    from crl.report.tables import write_report
    from crl.rundir import RunLock, clean_stale_tmp

    cfg, outcomes = load_run(run)
    with RunLock(run):
        clean_stale_tmp(run)
        return write_report(Path(run), outcomes, cfg)
