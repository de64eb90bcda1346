"""The verdict in the report: verdict.json (crl.audit.verdict's data), the report's first
section and the strongest attacks' table."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from crl.audit.outcome import TargetOutcome
from crl.audit.verdict import METRIC_NAMES, compute_verdict, console_lines
from crl.core.utils import write_json_atomic


def write_verdict(out: Path, outcomes: list[TargetOutcome], n_boot: int) -> dict[str, Any]:
    """verdict.json beside results.json (written atomically); returns its content."""
    verdict = compute_verdict(outcomes, n_boot=n_boot)
    write_json_atomic(Path(out) / "verdict.json", verdict)
    return verdict


def print_verdict(verdict: dict[str, Any], echo=print) -> None:
    """The verdict on the console, lines of at most 100 characters."""
    for line in console_lines(verdict):
        echo(line)


def verdict_section(verdict: dict[str, Any]) -> list[str]:
    """report.md's first section: one sentence per defense, or why there is no verdict."""
    parts = ["## Verdict", ""]
    if verdict["baseline"] is None:
        return parts + [f"No verdict: {verdict['reason']}.", ""]
    tpr = [METRIC_NAMES[m] for m in verdict["metrics"][1:]]
    parts += [f"- **{v['defense']}**: {v['sentence'].split(': ', 1)[1].rsplit(': ', 1)[0]}: "
              f"**{v['sentence'].rsplit(': ', 1)[1]}**" for v in verdict["defenses"]]
    parts += ["", f"Each defense against the baseline, {verdict['baseline_reason']}, on the same "
              "splits and seeds: the strongest attack by AUC"
              + (f" and by {tpr[0]} (the lowest FPR every target resolves)" if tpr else "")
              + ", on the released targets' own scores, and test accuracy; changes are defense "
              "minus baseline with 95% paired-bootstrap intervals over samples, averaged over "
              "seeds. Words by rule: " + verdict["rule"].split(": ", 1)[1], ""]
    return parts


def _value(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric == "auc" else f"{100 * v:.1f}%"


def _change(metric: str, c: dict[str, Any]) -> str:
    k, f = (1.0, "+.3f") if metric == "auc" else (100.0, "+.1f")
    lo, hi = c["ci"]
    return f"{k * c['change']:{f}} [{k * lo:{f}}, {k * hi:{f}}]"


def _rows(v: dict[str, Any]) -> list[str]:
    rows = []
    for metric, c in v["strongest"].items():
        attack = (c["attack"] if c["attack"] == c["baseline_attack"]
                  else f"{c['baseline_attack']} / {c['attack']}")
        rows.append(f"| {v['defense']} | {METRIC_NAMES[metric]} | {attack} | "
                    f"{_value(metric, c['baseline'])} | {_value(metric, c['defense'])} | "
                    f"{_change(metric, c)} |")
    a = v["accuracy"]
    rows.append(f"| {v['defense']} | Test accuracy | - | {_value('acc', a['baseline'])} | "
                f"{_value('acc', a['defense'])} | {_change('acc', a)} |")
    return rows


def strongest_table(verdict: dict[str, Any]) -> list[str]:
    """The numbers behind the verdict: per defense, the strongest attacks and test accuracy on
    the baseline and on the defense, and the change with its 95% interval."""
    if not verdict["defenses"]:
        return []
    base = verdict["baseline"]
    return ["## The strongest attacks", "",
            ("Target-only view (each released target's own scores), means over seeds; attack "
             f"names as '{base}'s / the defense's' when the strongest differs; AUC changes in "
             "AUC, the others in percentage points."), "",
            f"| Defense | Measure | Strongest attack | {base} | Defended | Change [95%] |",
            "|---|---|---|---|---|---|", *[r for v in verdict["defenses"] for r in _rows(v)], ""]
