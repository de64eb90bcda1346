"""report.md: the paper's Table 1 layout with 95% intervals, the comparison of every defense
against `ce` (paired bootstrap on the shared split, "within noise" when the interval holds 0),
leave-one-out rows, shadow-fitted attack accuracy, figures and warnings."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from crl.attacks.metrics import paired_difference_over_seeds, pooled_ci
from crl.audit.outcome import TargetOutcome
from crl.core.errors import CRLError
from crl.core.utils import write_text_atomic
from crl.report.cells import format_metric as _fmt
from crl.report.cells import metric_cell
from crl.report.cells import percent_scale as _pct
from crl.report.worst_case import most_exposed_summary, worst_case_table

METRICS = {"auc": "Attack AUC (the paper's Table 1 layout)",
           "tpr_at_1pct_fpr": "TPR at 1% FPR (%)", "tpr_at_0.1pct_fpr": "TPR at 0.1% FPR (%)"}


def _grouped(outcomes: list[TargetOutcome]) -> dict[str, list[TargetOutcome]]:
    groups: dict[str, list[TargetOutcome]] = defaultdict(list)
    for o in outcomes:
        groups[o.defense].append(o)
    return groups


def _mean_std(values: list[float]) -> str:
    v = 100.0 * np.asarray(values, dtype=np.float64)
    return f"{v[0]:.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def _interval_cell(group: list[TargetOutcome], attack: str, metric: str, n_boot: int) -> str:
    """`metric` of `attack` with its 95% interval: one seed, the interval the run computed
    (results.json); several, the mean over seeds with a bootstrap over seeds and samples."""
    if len(group) == 1:
        return metric_cell(group[0].attacks[attack].metrics, metric)
    if any(o.attacks[attack].metrics.get(metric) is None for o in group):
        return "n/a"
    samples = [(o.evaluated(o.attacks[attack].scores), o.is_member) for o in group]
    mean, lo, hi = pooled_ci(samples, metric, n_boot=n_boot, seed=0)
    return f"{_fmt(mean, metric)} [{_fmt(lo, metric)}, {_fmt(hi, metric)}]"


def format_table(outcomes: list[TargetOutcome], metric: str = "auc", *,
                 n_boot: int) -> str:
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
                     n_boot: int, baseline: str = "ce",
                     attacks: list[str] | None = None) -> str | None:
    """Difference of each defense's `metric` from the baseline's, per attack (`attacks`, default
    all), averaged over the seeds both ran, with a paired-bootstrap 95% interval; "within
    noise" if it includes 0."""
    groups = _grouped(outcomes)
    if baseline not in groups or len(groups) < 2:
        return None
    base = {o.seed: o for o in groups[baseline]}
    attacks = list(outcomes[0].attacks) if attacks is None else attacks
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


def leave_one_out_table(outcomes: list[TargetOutcome]) -> list[str]:
    """The leave-one-out rows with intervals clustered by sample; a skipped row says why."""
    first = outcomes[0].attacks
    loo = [a for a, r in first.items()
           if r.leave_one_out is not None or "loo_skipped" in r.extra]
    if not loo:
        return []
    parts = ["## Leave-one-out over all reference models (every model as the target)", "",
             ("Only models trained with the target's defense are pooled; a (model, sample) pair "
              "the model held out of training is left out. 95% intervals: bootstrap over samples "
              "(a sample's pairs move together); TPR only at FPRs of at least 1 / (distinct "
              "non-member samples), else n/a."), "",
             "| Defense | seed | " + " | ".join(f"{a} AUC | {a} TPR@0.1% (%)" for a in loo)
             + " |", "|" + "---|" * (2 + 2 * len(loo))]
    skipped = []
    for o in outcomes:
        cells = [o.defense, str(o.seed)]
        for a in loo:
            m = o.attacks[a].leave_one_out
            if m is None:
                cells += ["skipped", "skipped"]
                why = o.attacks[a].extra.get("loo_skipped", "no leave-one-out scores")
                skipped.append(f"- {o.defense} seed {o.seed}, {a}: skipped: {why}")
                continue
            cells += [metric_cell(m, "auc"), metric_cell(m, "tpr_at_0.1pct_fpr")]
        parts.append("| " + " | ".join(cells) + " |")
    return parts + ([""] + skipped if skipped else []) + [""]


def _extra_tables(outcomes: list[TargetOutcome], n_boot: int) -> list[str]:
    parts: list[str] = leave_one_out_table(outcomes)
    first = outcomes[0].attacks
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


FAMILIES = {"references": "Attacks with reference models", "shadows": "Shadow-model attacks"}
TARGET_ONLY = "Target-only attacks (the target's own outputs)"
TARGET_VIEW = ("Target-only view: each released target scored by each attack on its own members "
               "and non-members")


def attack_families(attacks: list[str], size: int = 5) -> list[tuple[str, list[str]]]:
    """The attacks grouped by what they need (reference models, shadow models, neither), in
    chunks of at most `size` so that no table needs scrolling sideways on a laptop."""
    from crl.attacks.base import build_attack

    groups: dict[str, list[str]] = {}
    for a in attacks:
        try:
            needs = build_attack(a).requirements()
        except CRLError:
            needs = frozenset()
        title = next((t for k, t in FAMILIES.items() if k in needs), TARGET_ONLY)
        groups.setdefault(title, []).append(a)
    out = []
    for title, names in groups.items():
        chunks = [names[i:i + size] for i in range(0, len(names), size)]
        out += [(title if len(chunks) == 1 else f"{title}, {k + 1} of {len(chunks)}", c)
                for k, c in enumerate(chunks)]
    return out


def accuracy_table(outcomes: list[TargetOutcome]) -> str:
    """Train and test accuracy per defense, mean ± std over seeds."""
    lines = ["| Defense | Train acc % | Test acc % |", "|---|---|---|"]
    for defense, group in _grouped(outcomes).items():
        lines.append(f"| {defense} | {_mean_std([o.train_acc for o in group])} | "
                     f"{_mean_std([o.test_acc for o in group])} |")
    return "\n".join(lines)


def family_tables(outcomes: list[TargetOutcome], metric: str, n_boot: int) -> list[str]:
    """`metric` per defense and attack with 95% intervals, one table per attack family."""
    parts: list[str] = []
    for title, names in attack_families(list(outcomes[0].attacks)):
        lines = ["| Defense | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for defense, group in _grouped(outcomes).items():
            cells = [_interval_cell(group, a, metric, n_boot) for a in names]
            lines.append("| " + " | ".join([defense, *cells]) + " |")
        parts += [f"### {title}", "", *lines, ""]
    return parts


def full_tables(outcomes: list[TargetOutcome], n_boot: int) -> list[str]:
    """The full tables: accuracies, every attack's metrics, and each defense minus `ce`."""
    parts = ["## Accuracy", "", ("Train accuracy on the members each target trained on, test "
              "accuracy on the held-out non-members; mean ± std over seeds."), "",
             accuracy_table(outcomes), ""]
    for metric, title in METRICS.items():
        parts += [f"## {title}", "", (f"{TARGET_VIEW}; value [95% interval], bootstrap over "
                   "samples and seeds."), "", *family_tables(outcomes, metric, n_boot)]
    for metric in ("auc", "tpr_at_1pct_fpr"):
        tables = [(title, comparison_table(outcomes, metric, n_boot=n_boot, attacks=names))
                  for title, names in attack_families(list(outcomes[0].attacks), size=3)]
        if any(t for _, t in tables):
            parts += [(f"## Each defense minus `ce`: {METRICS[metric]}, paired bootstrap "
                       "on the shared split"), "", (f"{TARGET_VIEW}, paired: the same attack on "
                       "the same samples for both models; \"within noise\" when the 95% "
                       "interval holds 0."), ""]
            parts += [line for title, t in tables for line in (f"### {title}", "", t, "")]
    return parts


def write_report(out: Path, outcomes: list[TargetOutcome], cfg) -> str:
    """Write report.md, report.html, verdict.json, figures/*.png and vulnerability files;
    return the AUC table. Order: verdict, strongest attacks, the figures behind the verdict,
    the full tables, the rest."""
    from crl.report.html import write_html
    from crl.report.plots import plot_margins, plot_rocs, plot_verdict_rocs
    from crl.report.verdict_section import strongest_table, verdict_section, write_verdict
    from crl.report.vulnerability import write_vulnerability

    n_boot = cfg.bootstrap
    verdict = write_verdict(out, outcomes, n_boot)
    plot_margins(out / "figures" / "margins.png", outcomes)
    plot_rocs(out / "figures" / "roc.png", outcomes)
    verdict_figures = plot_verdict_rocs(out / "figures", outcomes, verdict)
    write_vulnerability(out / "vulnerability", outcomes)
    parts = [f"# Membership-inference audit: {cfg.dataset} / {cfg.model}", ""]
    for o in outcomes:
        if o.chance_warning:
            parts += [f"> **WARNING ({o.defense}, seed {o.seed}): {o.chance_warning}**", ""]
    parts += verdict_section(verdict) + [_header(outcomes), ""] + _output_notes(outcomes)
    parts += strongest_table(verdict) + _verdict_figures(verdict_figures)
    parts += full_tables(outcomes, n_boot) + worst_case_table(outcomes, n_boot=n_boot)
    parts += epsilon_section(outcomes)
    parts += _captioned(_extra_tables(outcomes, n_boot) + _group_tables(outcomes))
    parts += ["## Every attack's ROC curve", "", (f"{TARGET_VIEW} (canary panels: leave-one-out "
               "pooled over every model), first seed; log-log axes, chance on the diagonal."),
              "", "![roc](figures/roc.png)", "", ("Most exposed training samples per attack: "
               "`vulnerability/` (exposure rankings with score distributions, `exposed_*.png` "
               "the 16 most exposed images)."), "", *most_exposed_summary(outcomes), ""]
    write_text_atomic(out / "report.md", "\n".join(split_wide_tables(parts)))
    write_html(out)   # report.html, rendered from the report.md just written
    return format_table(outcomes, "auc", n_boot=n_boot)


KEY_COLUMNS = ("Defense", "seed", "Attack", "Models")
WIDTH_BUDGET_PX = 1150   # what a 1280 px screen leaves a table (main's padding, the box)


def _width_px(column: list[str]) -> float:
    """About how wide a column renders in report.html (0.9 rem text, 0.9 rem padding a side)."""
    return 7.6 * max(len(c) for c in column) + 30


def _first_word(header: str) -> str:
    return (header.split() or [""])[0]


def _split_table(rows: list[list[str]]) -> list[list[list[str]]]:
    """The table (header first, no rule) cut into tables that each fit WIDTH_BUDGET_PX: the key
    columns (KEY_COLUMNS leading the header) repeated, the other columns in order, those whose
    headers share a first word (one attack's) kept together."""
    cols = list(zip(*rows))
    keys = next((k for k, h in enumerate(rows[0]) if h not in KEY_COLUMNS), len(cols))
    budget = WIDTH_BUDGET_PX - sum(_width_px(list(c)) for c in cols[:keys])
    units: list[list[int]] = []      # columns of one attack ("lira AUC", "lira TPR") together
    for j in range(keys, len(cols)):
        if units and _first_word(rows[0][units[-1][0]]) == _first_word(rows[0][j]):
            units[-1].append(j)
        else:
            units.append([j])
    chunks: list[list[int]] = [[]]
    used = 0.0
    for unit in units:
        w = sum(_width_px(list(cols[j])) for j in unit)
        if chunks[-1] and used + w > budget:
            chunks.append([])
            used = 0.0
        chunks[-1] += unit
        used += w
    return [[[r[k] for k in [*range(keys), *chunk]] for r in rows] for chunk in chunks]


def split_wide_tables(parts: list[str]) -> list[str]:
    """report.md's lines with every table too wide for a laptop screen cut in column groups
    (one table after the other, the key columns repeated), so that none scrolls sideways."""
    out: list[str] = []
    i = 0
    while i < len(parts):
        j = i
        while j < len(parts) and parts[j].startswith("|"):
            j += 1
        if j - i < 2:
            out.append(parts[i])
            i += 1
            continue
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for k, line in enumerate(parts[i:j]) if k != 1]
        tables = _split_table(rows) if len({len(r) for r in rows}) == 1 else [rows]
        for n, t in enumerate(tables):
            out += ([""] if n else []) + ["| " + " | ".join(t[0]) + " |",
                                          "|" + "---|" * len(t[0])]
            out += ["| " + " | ".join(r) + " |" for r in t[1:]]
        i = j
    return out


CAPTIONS = {
    "## Leave-one-out": "Leave-one-out pooled view: every pool model (the target and each "
    "reference model) in turn is the target, scored against the others, and the (score, "
    "membership) pairs are pooled over the models: many more non-members than one target, so "
    "lower FPRs resolve, and the value can differ from the target-only view.",
    "## Attack accuracy with per-class thresholds": "Thresholds fitted on shadow models (one "
    "per class), then applied to the target: the balanced accuracy an attacker reaches without "
    "the target's membership labels; the AUC and TPR views use those labels and read higher.",
    "## Attack AUC on the": f"{TARGET_VIEW}: a group of samples (e.g. those only a teacher "
    "model saw) as the positives against the same non-members; one target per row.",
}


def _captioned(parts: list[str]) -> list[str]:
    """`parts` with the one-line caption of CAPTIONS after each heading it knows."""
    out: list[str] = []
    for line in parts:
        out.append(line)
        caption = next((c for k, c in CAPTIONS.items() if line.startswith(k)), None)
        if caption:
            out += ["", caption]
    return out


def _verdict_figures(rocs: list[str]) -> list[str]:
    """The figures that show the verdict: each defense's strongest attack against the
    baseline's on one ROC plot, then the logit margins."""
    parts = ["## Figures behind the verdict", ""]
    if rocs:
        parts += [(f"{TARGET_VIEW}, first shared seed: the strongest attack by AUC on the "
                   "baseline and on each defense, on the same log-log axes (chance: the "
                   "diagonal)."), "", *(f"![roc {Path(p).stem}]({p})" for p in rocs), ""]
    parts += [("Logit margin to the decision boundary (the paper's Fig. 6) on members and "
               "non-members, first seed: the further apart, the more a threshold attack can "
               "tell them apart."), "", "![margins](figures/margins.png)", ""]
    return parts


def _output_notes(outcomes: list[TargetOutcome]) -> list[str]:
    """One line per defense whose released model changes its outputs at query time (HAMP)."""
    notes = {o.defense: o.defense_report["output_modification"] for o in outcomes
             if o.defense_report.get("output_modification")}
    return [line for d, note in notes.items() for line in (f"Note: `{d}`: {note}.", "")]


def _count(n: int, noun: str) -> str:
    return f"no {noun}s" if n == 0 else f"{n} {noun}{'s' if n != 1 else ''}"


USED_WORDS = {"target": "the target", "references": "reference models",
              "shadows": "shadow models",
              "references (pooled rows)": "reference models (pooled rows only)"}


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _models_line(outcomes: list[TargetOutcome]) -> str:
    """How the models were trained, how many reference and shadow models each target had and
    which models each attack used, from what ran (TargetOutcome.models_used)."""
    used = [o.models_used for o in outcomes if o.models_used]
    if len(used) < len(outcomes):
        return "Models each attack used: not recorded (a run written before crl recorded them)"
    refs = sorted({u["references"] for u in used})
    shadows = sorted({u["shadows"] for u in used})
    groups: dict[tuple[str, ...], list[str]] = {}
    for u in used:
        for name, kinds in u["attacks"].items():
            names = groups.setdefault(tuple(kinds), [])
            if name not in names:
                names.append(name)
    parts = [f"{', '.join(names)}: " + ("the target alone" if kinds == ("target",) else
                                        _and([USED_WORDS.get(k, k) for k in kinds]))
             for kinds, names in groups.items()]
    return (f"{'; '.join(sorted({u['trained_by'] for u in used}))}; per target "
            f"{' or '.join(_count(n, 'reference model') for n in refs)}, "
            f"{' or '.join(_count(n, 'shadow model') for n in shadows)}. Models each attack "
            f"used: {'; '.join(parts)}")


def _rmia_a(outcomes: list[TargetOutcome]) -> str:
    """RMIA's offline `a` where it was chosen on the reference models (extra['a_auc'])."""
    chosen = [f"{o.defense} seed {o.seed}: {o.attacks['rmia'].extra['a']}" for o in outcomes
              if "rmia" in o.attacks and "a_auc" in o.attacks["rmia"].extra]
    if not chosen:
        return ""
    return (f" RMIA's offline a, chosen on reference model 1 (results.json: rmia.a_auc): "
            f"{'; '.join(chosen)}.")


def _sampled(outcomes: list[TargetOutcome]) -> str:
    """How many samples each attack on a sample budget scored (extra['samples_scored'])."""
    counts = {f"{k}: {a.extra['samples_scored']:,} of {a.extra['samples_evaluated']:,}"
              for o in outcomes for k, a in o.attacks.items() if "samples_scored" in a.extra}
    if not counts:
        return ""
    return (f" Attacks on a sample budget score only some evaluated samples (per target): "
            f"{'; '.join(sorted(counts))}.")


def _header(outcomes: list[TargetOutcome]) -> str:
    seeds = sorted({o.seed for o in outcomes})
    n_m = sorted({int(o.evaluation.members.sum()) for o in outcomes})
    n_n = int(outcomes[0].evaluation.nonmembers.sum())
    text = (f"Members evaluated per target: {', '.join(map(str, n_m))} (what each released "
            f"model trained on); {n_n} non-members; seeds {seeds}. Accuracies: mean ± std over "
            "seeds. Attack cells: value [95% interval], bootstrap over samples and seeds. "
            f"{_models_line(outcomes)}."
            f"{_rmia_a(outcomes)}{_sampled(outcomes)}")
    if 0.001 * n_n < 1:
        text += (f" With {n_n} non-members one target resolves FPRs down to {100.0 / n_n:.2f}%: "
                 "TPR at 0.1% FPR is n/a; the leave-one-out rows pool every model but resolve "
                 "only down to 1 / (distinct non-member samples).")
    return text


def _eps(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def epsilon_section(outcomes: list[TargetOutcome]) -> list[str]:
    """report.md's "Empirical epsilon" section (--canaries; crl.audit.epsilon): per target,
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
