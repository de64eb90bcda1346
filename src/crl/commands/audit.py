"""`crl audit`: the audit's stages and run directory (crl.audit.pipeline.run_audit) with its report
(crl.report.write_report, looked up when the command runs)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from crl import report
from crl.audit.pipeline import run_audit
from crl.config import AuditConfig


def audit(cfg: AuditConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole `crl audit`: returns run_audit's {'rows', 'outcomes', 'out'}."""
    return run_audit(cfg, write_report=report.write_report, echo=echo)
