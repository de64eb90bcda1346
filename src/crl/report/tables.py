"""report.md: the paper's Table 1 layout with 95% intervals, the comparison of every defense
against `ce` (paired bootstrap on the shared split, "within noise" when the interval holds 0),
leave-one-out rows, shadow-fitted attack accuracy, figures and warnings."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from crl.audit.outcome import TargetOutcome
from crl.metrics import paired_difference_over_seeds, pooled_ci
from crl.utils import write_text_atomic

METRICS = {"auc": "Attack AUC (the paper's Table 1 layout)",
           "tpr_at_1pct_fpr": "TPR at 1% FPR (%)", "tpr_at_0.1pct_fpr": "TPR at 0.1% FPR (%)"}


def _grouped(outcomes: list[TargetOutcome]) -> dict[str, list[TargetOutcome]]:
    groups: dict[str, list[TargetOutcome]] = defaultdict(list)
    for o in outcomes:
        groups[o.defense].append(o)
    return groups


def _pct(metric: str) -> float:
    return 1.0 if metric == "auc" else 100.0


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "n/a"
    return f"{v * _pct(metric):.3f}" if metric == "auc" else f"{v * _pct(metric):.1f}"


def _mean_std(values: list[float]) -> str:
    v = 100.0 * np.asarray(values, dtype=np.float64)
    return f"{v[0]:.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _interval_cell(group: list[TargetOutcome], attack: str, metric: str, n_boot: int) -> str:
    if any(o.attacks[attack].metrics.get(metric) is None for o in group):
        return "n/a"
    samples = [(o.evaluated(o.attacks[attack].scores), o.is_member) for o in group]
    mean, lo, hi = pooled_ci(samples, metric, n_boot=n_boot, seed=0)
    return f"{_fmt(mean, metric)} [{_fmt(lo, metric)}, {_fmt(hi, metric)}]"


def format_table(outcomes: list[TargetOutcome], metric: str = "auc", *,
                 n_boot: int = 200) -> str:
    """One row per defense: accuracies (mean ± std over seeds), then `metric` per attack with a
    95% interval over samples and seeds together."""
    if not outcomes:
        return "(no results)"
    attacks = list(outcomes[0].attacks)
    head = ["Defense", "Train acc %", "Test acc %"] + attacks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for defense, group in _grouped(outcomes).items():
        cells = [defense, _mean_std([o.train_acc for o in group]),
                 _mean_std([o.test_acc for o in group])]
        cells += [_interval_cell(group, a, metric, n_boot) for a in attacks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _side(o: TargetOutcome, attack: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sel = o.evaluation.evaluated
    return o.evaluation.sample_idx[sel], o.attacks[attack].scores[sel], o.evaluation.members[sel]


def comparison_table(outcomes: list[TargetOutcome], metric: str = "auc", *,
                     n_boot: int = 200, baseline: str = "ce") -> str | None:
    """Difference of each defense's `metric` from the baseline's, per attack, averaged over the
    seeds both ran, with a paired-bootstrap 95% interval; "within noise" if it includes 0."""
    groups = _grouped(outcomes)
    if baseline not in groups or len(groups) < 2:
        return None
    base = {o.seed: o for o in groups[baseline]}
    attacks = list(outcomes[0].attacks)
    lines = ["| Defense | " + " | ".join(attacks) + " |", "|" + "---|" * (len(attacks) + 1)]
    for defense, group in groups.items():
        pairs = [(o, base[o.seed]) for o in group if o.seed in base and defense != baseline]
        if not pairs:
            continue
        cells = [defense]
        for a in attacks:
            d = paired_difference_over_seeds([_side(o, a) for o, _ in pairs],
                                  [_side(b, a) for _, b in pairs], metric, n_boot=n_boot, seed=0)
            if d["ci"] is None:
                cells.append("n/a")
                continue
            lo, hi = d["ci"]
            tag = " within noise" if d["within_noise"] else ""
            cells.append(f"{d['diff'] * _pct(metric):+.3f} [{lo * _pct(metric):+.3f}, "
                         f"{hi * _pct(metric):+.3f}]{tag}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extra_tables(outcomes: list[TargetOutcome], n_boot: int) -> list[str]:
    parts: list[str] = []
    first = outcomes[0].attacks
    loo = [a for a, r in first.items() if r.leave_one_out is not None]
    if loo:
        parts += ["## Leave-one-out over all reference models (every model as the target)", "",
                  "| Defense | seed | " + " | ".join(f"{a} AUC | {a} TPR@0.1%" for a in loo)
                  + " |", "|" + "---|" * (2 + 2 * len(loo))]
        for o in outcomes:
            cells = [o.defense, str(o.seed)]
            for a in loo:
                m = o.attacks[a].leave_one_out or {}
                cells += [_fmt(m.get("auc"), "auc"),
                          _fmt(m.get("tpr_at_0.1pct_fpr"), "tpr_at_0.1pct_fpr")]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    acc = [a for a, r in first.items() if "shadow_threshold_accuracy" in r.extra]
    if acc:
        parts += ["## Attack accuracy with per-class thresholds fitted on shadow models (%)", "",
                  "| Defense | " + " | ".join(acc) + " |", "|" + "---|" * (len(acc) + 1)]
        for defense, group in _grouped(outcomes).items():
            parts.append("| " + " | ".join([defense] + [_mean_std(
                [o.attacks[a].extra["shadow_threshold_accuracy"] for o in group])
                for a in acc]) + " |")
        parts.append("")
    return parts


def _group_tables(outcomes: list[TargetOutcome]) -> list[str]:
    names = sorted({g for o in outcomes for a in o.attacks.values() for g in a.groups})
    parts: list[str] = []
    for g in names:
        parts += [f"## Attack AUC on the `{g}` samples vs the non-members", "",
                  "| Defense | seed | " + " | ".join(outcomes[0].attacks) + " |",
                  "|" + "---|" * (2 + len(outcomes[0].attacks))]
        for o in outcomes:
            if any(g in a.groups for a in o.attacks.values()):
                parts.append("| " + " | ".join([o.defense, str(o.seed)] + [
                    _fmt(a.groups.get(g, {}).get("auc"), "auc") for a in o.attacks.values()])
                    + " |")
        parts.append("")
    return parts


def write_report(out: Path, outcomes: list[TargetOutcome], cfg) -> str:
    """Write report.md, report.html, figures/*.png and vulnerability files; return the AUC
    table."""
    from crl.report.html import write_html
    from crl.report.plots import plot_margins, plot_rocs
    from crl.report.vulnerability import write_vulnerability
    from crl.report.worst_case import most_exposed_summary, worst_case_table

    n_boot = int(getattr(cfg, "bootstrap", 200))
    plot_margins(out / "figures" / "margins.png", outcomes)
    plot_rocs(out / "figures" / "roc.png", outcomes)
    write_vulnerability(out / "vulnerability", outcomes)
    auc = format_table(outcomes, "auc", n_boot=n_boot)
    parts = [f"# Membership-inference audit: {cfg.dataset} / {cfg.model}", ""]
    for o in outcomes:
        if o.chance_warning:
            parts += [f"> **WARNING ({o.defense}, seed {o.seed}): {o.chance_warning}**", ""]
    parts += [_header(outcomes, cfg), ""]
    for metric, title in METRICS.items():
        parts += [f"## {title}", "", auc if metric == "auc" else
                  format_table(outcomes, metric, n_boot=n_boot), ""]
    parts += worst_case_table(outcomes, n_boot=n_boot) + epsilon_section(outcomes)
    for metric in ("auc", "tpr_at_1pct_fpr"):
        cmp = comparison_table(outcomes, metric, n_boot=n_boot)
        if cmp:
            parts += [f"## Each defense minus `ce`: {METRICS[metric]}, paired bootstrap "
                      "on the shared split", "", cmp, ""]
    parts += _extra_tables(outcomes, n_boot) + _group_tables(outcomes)
    parts += ["## Figures", "", "![margins](figures/margins.png)", "", "![roc](figures/roc.png)",
              "", "Most exposed training samples per attack: `vulnerability/` (exposure "
              "rankings with score distributions, `exposed_*.png` the 16 most exposed images).",
              "", *most_exposed_summary(outcomes), ""]
    write_text_atomic(out / "report.md", "\n".join(parts))
    write_html(out)   # report.html, rendered from the report.md just written
    return auc


def _recipe(cfg) -> str:
    """The training recipe, or who trained the models when crl did not (crl.audit_training)."""
    if cfg.epochs is None:
        return "Models trained by the caller's own code (crl.audit_training)"
    return f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}"


def _shadows(outcomes: list[TargetOutcome], cfg) -> str:
    """The shadow models, when an attack used them (the NN attack, shadow-fitted thresholds)."""
    used = any(name == "nn" or "shadow_threshold_accuracy" in {**a.metrics, **a.extra}
               for o in outcomes for name, a in o.attacks.items())
    if not (used and cfg.shadows):
        return "no shadow models"
    return f"{cfg.shadows} shadow model{'s' if cfg.shadows != 1 else ''}"


def _references(outcomes: list[TargetOutcome]) -> str:
    """How many reference models each target had (the pool models besides the target)."""
    counts = sorted({0 if o.model_member is None else len(o.model_member) - 1 for o in outcomes})
    if counts == [0]:
        return "no reference models"
    noun = "reference model" if counts == [1] else "reference models"
    return f"{' or '.join(map(str, counts))} {noun} (LiRA/RMIA)"


def _header(outcomes: list[TargetOutcome], cfg) -> str:
    seeds = sorted({o.seed for o in outcomes})
    n_m = sorted({int(o.evaluation.members.sum()) for o in outcomes})
    n_n = int(outcomes[0].evaluation.nonmembers.sum())
    text = (f"Members evaluated per target: {', '.join(map(str, n_m))} (what each released "
            f"model trained on); {n_n} non-members; seeds {seeds}. Accuracies: mean ± std over "
            "seeds. Attack cells: value [95% interval], bootstrap over samples and seeds. "
            f"{_recipe(cfg)}; {_shadows(outcomes, cfg)}, {_references(outcomes)}.")
    if 0.001 * n_n < 1:
        text += (f" With {n_n} non-members one target resolves FPRs down to {100.0 / n_n:.2f}%: "
                 "TPR at 0.1% FPR is n/a; the leave-one-out rows pool every model and resolve "
                 "lower FPRs.")
    return text


def _eps(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def epsilon_section(outcomes: list[TargetOutcome]) -> list[str]:
    """report.md's "Empirical epsilon" section (--canaries; crl.privacy_audit): per target,
    the one-run bound with its ceiling, the two-point bound over the reference models, and
    the DP accountant's epsilon where the defense has one; empty without canaries."""
    rows = [(o, o.canaries["epsilon_lower_bound"]) for o in outcomes
            if o.canaries and "epsilon_lower_bound" in o.canaries]
    if not rows:
        return []
    delta = rows[0][1]["delta"]
    meaning = ("One run (Steinke et al. 2023): a lower bound at 95% that holds for the "
               "randomised canaries of this audit (each included in the target independently "
               "with probability 1/2), from the named attack's guesses on its highest and "
               "lowest canary scores; the ceiling is the most any attack could prove with these "
               "canaries. Two-point (Jagielski et al. 2020): over the reference models, "
               "threshold fitted on half of them; an empirical epsilon, not a certificate "
               "(canary memberships across models are not independent). Not an upper bound on "
               "leakage.")
    parts = [f"## Empirical epsilon lower bounds (delta {delta:g}, 95%)", "", meaning, ""]
    parts += [f"> **WARNING ({o.defense}, seed {o.seed}): {e['warning']}**"
              for o, e in rows if e.get("warning")]
    parts += [("| Defense | Seed | Attack | One run (ceiling) | Correct / guesses | Two-point | "
               "Accountant's epsilon |"), "|---|---|---|---|---|---|---|"]
    for o, e in rows:
        one, many = e["one_run"], e.get("many_runs") or {}
        if "skipped" in one:
            parts.append(f"| {o.defense} | {o.seed} | {e['attack']} | skipped: "
                         f"{one['skipped']} | - | - | {_eps(e.get('accountant_epsilon'))} |")
            continue
        parts.append(f"| {o.defense} | {o.seed} | {e['attack']} | "
                     f"{_eps(one['epsilon_lower_bound'])} ({_eps(one['ceiling'])}) | "
                     f"{one['correct']} / {one['guesses']} of {one['canaries']} | "
                     f"{_eps(many.get('epsilon_lower_bound'))} | "
                     f"{_eps(e.get('accountant_epsilon'))} |")
    return parts + [""]
