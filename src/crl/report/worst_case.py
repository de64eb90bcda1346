"""report.md's "Worst case" table (--canaries): every attack on the canaries vs on the population,
both pooled leave-one-out over all models and over seeds (crl.audit.canary_metrics)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from crl.audit.canary_metrics import pooled_metrics, pooled_view
from crl.audit.outcome import TargetOutcome
from crl.report.cells import metric_cell

WORST_METRICS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")
_TITLES = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR@1% (%)", "tpr_at_0.1pct_fpr": "TPR@0.1% (%)"}


def _parts(group: list[TargetOutcome], attack: str, canary: bool) -> list[tuple]:
    """(scores, membership, sample ids) of every model on the canaries or on the rest of the
    pool, one part per seed."""
    parts = []
    for o in group:
        cols = o.evaluation.canary if canary else ~o.evaluation.canary
        s, m = pooled_view(o.attacks[attack], o.model_member, o.model_held_out)
        parts.append((s[:, cols], m[:, cols], o.evaluation.sample_idx[cols]))
    return parts


def pooled_side(group: list[TargetOutcome], attack: str, canary: bool, n_boot: int) -> dict:
    """Metrics with intervals of `attack` on the canaries (or the population) of `group`."""
    return pooled_metrics(_parts(group, attack, canary), n_boot=n_boot, seed=0)


def _fpr(m: dict) -> str:
    v = m.get("min_resolvable_fpr")
    return "n/a" if v is None else f"{100 * v:.3g}%"


def _row(defense: str, group: list[TargetOutcome], attack: str, n_boot: int) -> str:
    pop, can = (pooled_side(group, attack, c, n_boot) for c in (False, True))
    star = "" if group[0].attacks[attack].pooled is not None else " *"
    cells = [defense, attack + star, str(can.get("models", 0))]
    for metric in WORST_METRICS:
        cells += [metric_cell(pop, metric), metric_cell(can, metric)]
    cells.append(f"{_fpr(pop)} / {_fpr(can)}")
    return "| " + " | ".join(cells) + " |"


def worst_case_table(outcomes: list[TargetOutcome], *, n_boot: int) -> list[str]:
    """The "Worst case" section of report.md; empty without canaries."""
    chosen = [o for o in outcomes if o.canaries and o.model_member is not None]
    if not chosen:
        return []
    groups: dict[str, list[TargetOutcome]] = defaultdict(list)
    for o in chosen:
        groups[o.defense].append(o)
    first = chosen[0]
    head = ["Defense", "Attack", "Models"]
    for metric in WORST_METRICS:
        head += [f"Population {_TITLES[metric]}", f"Canary {_TITLES[metric]}"]
    head.append("Smallest resolvable FPR (population / canary)")
    lines = [
        (f"## Worst case: {first.canaries['n']} {first.canaries['kind']} canaries vs the "
         "population"), "",
        ("Each canary is a member of a random half of the models (the target and every "
         "reference model). Every model in turn is the target against the others "
         "(leave-one-out); its scores on the canaries, or on the rest of the target pool "
         "(population), are pooled over models and seeds. 95% intervals: bootstrap over samples "
         "(a sample's scores in every model and seed move together). * = no leave-one-out "
         "scores for this attack: the targets alone. Models: pooled models (all seeds)."), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for defense, group in groups.items():
        lines += [_row(defense, group, a, n_boot) for a in group[0].attacks]
    return lines + [""]


def most_exposed_summary(outcomes: list[TargetOutcome]) -> list[str]:
    """One line per target: how many samples every model that trained on them exposes."""
    lines = []
    for o in outcomes:
        e = o.exposure
        if e is None:
            continue
        full = int(np.sum(e.values >= 1.0))
        can = e.values[o.evaluation.canary]
        extra = (f"; canaries: mean exposure {np.nanmean(can):.2f}" if can.size
                 and np.isfinite(can).any() else "")
        lines.append(f"- {o.defense} seed {o.seed} ({e.attack}, threshold at "
                     f"{100 * e.fpr:g}% FPR per model): {full} samples exposed by every model "
                     f"that trained on them; population mean exposure "
                     f"{np.nanmean(e.values[~o.evaluation.canary]):.2f}{extra}")
    return lines
