"""`crl report RUN`: report.md, report.html, figures/, vulnerability/ and results.json of a
finished audit run, rebuilt without training from its config.yaml and the per-target outcomes
in RUN/scores/, after checking the run against its manifest.json (crl.core.manifest): a missing or
changed file, a scores file the run did not write, a foreign config.yaml or an unfinished run
is refused in one line; the report's own files (REPORT_FILES) are rewritten whatever they hold,
and the manifest updated for them. A run written before manifests existed is rendered with a
warning that it is not verified."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from crl.audit.outcome import TargetOutcome, load_outcome, outcome_path
from crl.config import AuditConfig, load_yaml_recipe
from crl.core.errors import CRLError
from crl.core.manifest import (
    MANIFEST,
    config_identity,
    config_sha256,
    file_problems,
    read_manifest,
    refresh_manifest,
)

#: what rebuilding the report rewrites (a folder ends in '/')
REPORT_FILES = ("report.md", "report.html", "results.json", "verdict.json", "figures/",
                "vulnerability/")
AUDITS = ("audit", "audit_training")


def _not_a_run(run: Path, why: str) -> CRLError:
    return CRLError(f"report.run = '{run}': expected a finished crl audit run directory ({why})")


def load_run(run: str | Path) -> tuple[AuditConfig, list[TargetOutcome]]:
    """The run's resolved config and its outcomes in the audit's order: defenses as configured,
    then seeds; verified against the run's manifest (a run without one: a warning)."""
    run = Path(run)
    cfg, paths = _layout(run)
    verify_run(run)
    return cfg, [_outcome(run, p, d, s) for p, (d, s) in paths.items()]


def _layout(run: Path) -> tuple[AuditConfig, dict[Path, tuple[str, int]]]:
    """The run's config and the scores file of each (defense, seed); a CRLError when the
    directory is not a finished audit's."""
    if not run.is_dir():
        raise _not_a_run(run, "no such directory" if not run.exists() else "not a directory")
    for name in ("config.yaml", "scores"):
        if not (run / name).exists():
            raise _not_a_run(run, f"it has no {name}")
    try:
        cfg = AuditConfig(**load_yaml_recipe(run / "config.yaml")).resolved()
    except CRLError as e:
        raise _not_a_run(run, f"its config.yaml is not an audit's: {e}") from None
    paths = {outcome_path(run / "scores", d, s): (d, s) for d in cfg.defenses for s in cfg.seeds}
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _not_a_run(run, f"{len(missing)} of {len(paths)} score files missing, e.g. "
                              f"{missing[0].relative_to(run)}: an unfinished audit; rerun it "
                              "with --resume")
    return cfg, paths


def verify_run(run: Path) -> dict[str, Any] | None:
    """The run's manifest after checking every file against it but the report's own, which the
    rebuild rewrites; None (and a warning on stderr) for a run written before manifests
    existed; a one-line CRLError for what does not match."""
    try:
        manifest = read_manifest(run)
    except CRLError as e:
        raise CRLError(f"report.run = '{run}': {e}") from None
    if manifest is None:
        print(f"crl: warning: {run} not verified (no manifest): written before crl checksummed "
              "its run directories; its scores are rendered as found", file=sys.stderr)
        return None
    if manifest["command"] not in AUDITS:
        raise _not_a_run(run, f"its {MANIFEST} says it was written by {manifest['command']}")
    if manifest["state"] != "complete":
        raise _not_a_run(run, f"its {MANIFEST} says an unfinished run (killed, or still "
                              "running): rerun it with --resume")
    problems = _config_problems(run, manifest) + file_problems(run, manifest, skip=REPORT_FILES)
    if problems:
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})"
        raise CRLError(f"report.run = '{run}': {problems[0]}{more}; expected the files its "
                       f"{MANIFEST} lists, unchanged")
    return manifest


def _config_problems(run: Path, manifest: dict[str, Any]) -> list[str]:
    """['config.yaml is another run's config'] when its hash is not the manifest's."""
    try:
        identity = config_identity(yaml.safe_load((run / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, TypeError, ValueError):
        identity = None
    if identity is not None and config_sha256(identity) == manifest["config_sha256"]:
        return []
    return [(f"config.yaml is not the config this run was written with (a foreign config: its "
             f"hash is not {MANIFEST}'s config_sha256)")]


def _outcome(run: Path, path: Path, defense: str, seed: int) -> TargetOutcome:
    """The outcome saved in `path`, which must be the scores of (defense, seed)."""
    rel = path.relative_to(run)
    try:
        o = load_outcome(path)
    except CRLError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to decode means a damaged file
        raise CRLError(f"report.run = '{run}': scores file {rel} is unreadable "
                       f"({type(e).__name__}); expected a file written by crl audit") from None
    if (o.defense, o.seed) != (defense, seed):
        raise CRLError(f"report.run = '{run}': scores file {rel} holds the scores of "
                       f"{o.defense} seed {o.seed}; expected {defense} seed {seed}")
    return o


def rebuild_report(run: str | Path) -> str:
    """Rewrite the run's report files and results.json from its saved outcomes, then update
    the manifest's entries of the files rewritten; returns the AUC table."""
    from crl.core.utils import write_json_atomic
    from crl.report.tables import write_report
    from crl.rundir import RunLock, clean_stale_tmp

    run = Path(run)
    cfg, outcomes = load_run(run)
    before = (run / MANIFEST).read_bytes() if (run / MANIFEST).exists() else None
    with RunLock(run):
        now = (run / MANIFEST).read_bytes() if (run / MANIFEST).exists() else None
        if now != before:
            raise CRLError(f"report.run = '{run}': its {MANIFEST} changed while the run was "
                           "read (another crl process wrote it); expected a finished run")
        clean_stale_tmp(run)
        table = write_report(run, outcomes, cfg)
        write_json_atomic(run / "results.json", [o.row() for o in outcomes])
        manifest = read_manifest(run)
        if manifest is not None:
            refresh_manifest(run, manifest, REPORT_FILES)
        return table
