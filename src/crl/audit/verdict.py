"""The verdict of an audit: each defense against the baseline (`ce`, else the first defense
listed) on the same splits and seeds, computed from the outcomes, never written by hand.

For each defense: the change in test accuracy and the change of the strongest attack, each with
a 95% paired-bootstrap interval over samples (seeds averaged, as
`crl.attacks.metrics.paired_difference_over_seeds`). "The strongest attack" (`strongest`) is
the attack with the highest value of a metric, over every attack that ran; it is taken twice: by
AUC, and
by TPR at the lowest FPR level every target resolves (`lowest_resolved_tpr`). It is chosen on
each side: the change is (strongest on the defense) minus (strongest on the baseline), the two
sides paired over the samples they share.

Words, by rule from the 95% intervals (docs/attacks.md, "The verdict"):
- "leaks more than <baseline>" when a strongest attack's change lies wholly above 0;
- else "protects" when one lies wholly below 0;
- else "within noise of <baseline> on the strongest attacks";
- then "at a cost" when the test-accuracy change lies wholly below 0, "and more accurate" when
  wholly above, nothing otherwise.

This module imports nothing from crl.audit or crl.report at load time, so the audit stages,
`crl tune`, the report and benchmarks can all import it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from crl.attacks.metrics import LOW_FPRS, paired_difference_over_seeds
from crl.core.seeding import numpy_rng

if TYPE_CHECKING:
    from crl.audit.outcome import TargetOutcome

LEVEL = 0.95
RULE = ("95% paired intervals: 'protects' when the strongest attack's change lies wholly below "
        "0, 'leaks more' when one lies wholly above 0, 'within noise' otherwise; 'at a cost' when "
        "the test-accuracy change lies wholly below 0.")
METRIC_NAMES = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR at 1% FPR",
                "tpr_at_0.1pct_fpr": "TPR at 0.1% FPR", "tpr_at_0.01pct_fpr": "TPR at 0.01% FPR"}


def strongest(values: Mapping[str, float | None]) -> str | None:
    """The name with the highest value (None values skipped, the first listed on ties); None
    when no name has a value. The one definition of "the strongest attack" in crl."""
    best = None
    for name, v in values.items():
        if v is not None and np.isfinite(v) and (best is None or v > values[best]):
            best = name
    return best


def lowest_resolved_tpr(outcomes: list[TargetOutcome]) -> str | None:
    """The TPR metric at the lowest FPR level that every target resolves for every attack."""
    for key in sorted(LOW_FPRS, key=LOW_FPRS.get):
        if all(a.metrics.get(key) is not None for o in outcomes for a in o.attacks.values()):
            return key
    return None


def mean_metric(outcomes: list[TargetOutcome], attack: str, metric: str) -> float | None:
    """`metric` of `attack` averaged over the outcomes (None when one target lacks it)."""
    values = [o.attacks[attack].metrics.get(metric) for o in outcomes]
    return None if any(v is None for v in values) else float(np.mean(values))


def strongest_attack(outcomes: list[TargetOutcome], metric: str) -> str | None:
    """The attack with the highest `metric` averaged over the outcomes (e.g. seeds)."""
    return strongest({a: mean_metric(outcomes, a, metric) for a in outcomes[0].attacks})


def baseline_of(defenses: list[str]) -> tuple[str | None, str]:
    """The baseline defense and why it was chosen (None with the reason: no verdict)."""
    if len(defenses) < 2:
        return None, (f"only one training audited ({', '.join(defenses) or 'none'}): a verdict "
                      "compares each defense with a baseline (ce) on the same splits; audit "
                      "two or more, e.g. --defenses ce,crl")
    if "ce" in defenses:
        return "ce", "ce (plain cross-entropy training)"
    return defenses[0], f"{defenses[0]} (no ce in this audit: the first defense listed)"


# --------------------------------------------------------------------------- paired changes

def _test_correct(o: TargetOutcome) -> tuple[np.ndarray, np.ndarray]:
    """(sample ids, correct 0/1) on the target's non-members (its test set): a logit margin
    above 0 is a correct prediction."""
    ev = o.evaluation
    return ev.sample_idx[ev.nonmembers], (np.asarray(o.margins)[ev.nonmembers] > 0).astype(float)


def paired_accuracy_change(pairs: list[tuple[TargetOutcome, TargetOutcome]], *, n_boot: int,
                           seed: int = 0) -> dict[str, Any]:
    """Test accuracy (from the saved logit margins) of defense minus baseline, averaged over the
    seeds of `pairs` = [(defense, baseline)], with a 95% paired-bootstrap interval that resamples
    each seed's shared test samples."""
    rng = numpy_rng(seed, "verdict", "accuracy")
    diffs, reps, accs = [], [], []
    for o, b in pairs:
        ids_o, c_o = _test_correct(o)
        ids_b, c_b = _test_correct(b)
        _, io, ib = np.intersect1d(ids_o, ids_b, return_indices=True)
        d = c_o[io] - c_b[ib]
        draws = rng.integers(0, len(d), size=(n_boot, len(d)))
        diffs.append(d.mean())
        reps.append(d[draws].mean(1))
        accs.append((c_o.mean(), c_b.mean()))
    lo, hi = np.percentile(np.mean(reps, axis=0), [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return {"defense": float(np.mean([a for a, _ in accs])),
            "baseline": float(np.mean([b for _, b in accs])),
            "change": float(np.mean(diffs)), "ci": [float(lo), float(hi)]}


def _side(o: TargetOutcome, attack: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sel = o.evaluation.evaluated
    return o.evaluation.sample_idx[sel], o.attacks[attack].scores[sel], o.evaluation.members[sel]


def strongest_change(pairs: list[tuple[TargetOutcome, TargetOutcome]], metric: str, *,
                     n_boot: int, seed: int = 0) -> dict[str, Any] | None:
    """The strongest attack by `metric` on the defense and on the baseline, their values and the
    paired change (defense minus baseline) with its 95% interval; None when no attack has it."""
    ours, base = [o for o, _ in pairs], [b for _, b in pairs]
    a_ours, a_base = strongest_attack(ours, metric), strongest_attack(base, metric)
    if a_ours is None or a_base is None:
        return None
    d = paired_difference_over_seeds([_side(o, a_ours) for o in ours],
                                     [_side(b, a_base) for b in base], metric, n_boot=n_boot,
                                     seed=seed, level=LEVEL)
    if d["ci"] is None:
        return None
    return {"metric": metric, "attack": a_ours, "baseline_attack": a_base,
            "defense": mean_metric(ours, a_ours, metric),
            "baseline": mean_metric(base, a_base, metric),
            "change": d["diff"], "ci": [float(v) for v in d["ci"]]}


# --------------------------------------------------------------------------- words

def words_of(changes: list[dict[str, Any]], accuracy: dict[str, Any], baseline: str
             ) -> tuple[str, str]:
    """(privacy words, cost words) by the rule in the module docstring."""
    if any(c["ci"][0] > 0 for c in changes):
        privacy = f"leaks more than {baseline}"
    elif any(c["ci"][1] < 0 for c in changes):
        privacy = "protects"
    else:
        privacy = f"within noise of {baseline} on the strongest attacks"
    lo, hi = accuracy["ci"]
    cost = "at a cost" if hi < 0 else "and more accurate" if lo > 0 else ""
    return privacy, cost


def _scale(metric: str) -> tuple[float, str, str]:
    """(multiplier, value format, unit of a change) of a metric in text."""
    return (1.0, ".2f", "") if metric == "auc" else (100.0, ".1f", " points")


def change_text(c: dict[str, Any]) -> str:
    """e.g. "LiRA AUC 0.80 -> 0.68 (-0.12 [-0.16, -0.09])"."""
    k, f, unit = _scale(c["metric"])
    pct = "" if c["metric"] == "auc" else "%"
    name, lo, hi = METRIC_NAMES[c["metric"]], *c["ci"]
    base, ours = f"{k * c['baseline']:{f}}{pct}", f"{k * c['defense']:{f}}{pct}"
    change = f"({k * c['change']:+{f}} [{k * lo:+{f}}, {k * hi:+{f}}]{unit})"
    if c["attack"] == c["baseline_attack"]:
        return f"{c['attack']} {name} {base} -> {ours} {change}"
    return f"{name} {c['baseline_attack']} {base} -> {c['attack']} {ours} {change}"


def accuracy_text(a: dict[str, Any]) -> str:
    lo, hi = a["ci"]
    return (f"test accuracy {100 * a['baseline']:.1f}% -> {100 * a['defense']:.1f}% "
            f"({100 * a['change']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] points)")


def sentence(v: dict[str, Any]) -> str:
    """The one sentence of a defense's verdict."""
    parts = [change_text(c) for c in v["strongest"].values()] + [accuracy_text(v["accuracy"])]
    words = v["words"] + (f", {v['cost']}" if v["cost"] else "")
    return f"{v['defense']}: {'; '.join(parts)}: {words}"


# --------------------------------------------------------------------------- the verdict

def defense_verdict(group: list[TargetOutcome], base: dict[int, TargetOutcome], baseline: str,
                    metrics: list[str], n_boot: int) -> dict[str, Any] | None:
    """One defense's verdict against the baseline's outcomes by seed (None: no shared seed)."""
    pairs = [(o, base[o.seed]) for o in group if o.seed in base]
    if not pairs:
        return None
    changes = {m: c for m in metrics
               if (c := strongest_change(pairs, m, n_boot=n_boot)) is not None}
    accuracy = paired_accuracy_change(pairs, n_boot=n_boot)
    privacy, cost = words_of(list(changes.values()), accuracy, baseline)
    v = {"defense": group[0].defense, "seeds": [o.seed for o, _ in pairs], "words": privacy,
         "cost": cost, "accuracy": accuracy, "strongest": changes}
    v["sentence"] = sentence(v)
    return v


def compute_verdict(outcomes: list[TargetOutcome], *, n_boot: int) -> dict[str, Any]:
    """verdict.json's content: the baseline, the metrics, the rule and one verdict per defense
    (`defenses`); `reason` says why there is none when there is none."""
    groups: dict[str, list[TargetOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.defense, []).append(o)
    baseline, why = baseline_of(list(groups))
    tpr = lowest_resolved_tpr(outcomes) if outcomes else None
    metrics = ["auc"] + ([tpr] if tpr else [])
    out: dict[str, Any] = {"baseline": baseline, "baseline_reason": why if baseline else None,
                           "metrics": metrics, "level": LEVEL, "n_boot": n_boot, "rule": RULE,
                           "defenses": [], "reason": None if baseline else why}
    if baseline is None:
        return out
    base = {o.seed: o for o in groups[baseline]}
    for defense, group in groups.items():
        if defense != baseline:
            v = defense_verdict(group, base, baseline, metrics, n_boot)
            if v is not None:
                out["defenses"].append(v)
    return out


def wrap(text: str, width: int = 100, indent: str = "  ") -> list[str]:
    """`text` as lines of at most `width` characters, continuation lines indented."""
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent=indent + "  ",
                         initial_indent=indent, break_on_hyphens=False)


def console_lines(v: dict[str, Any]) -> list[str]:
    """The verdict for the terminal: lines of at most 100 characters."""
    if v["baseline"] is None:
        return wrap(f"Verdict: none ({v['reason']})", indent="")
    head = (f"Verdict: each defense vs {v['baseline']}, same splits and seeds, 95% paired "
            "intervals")
    lines = wrap(head, indent="")
    for d in v["defenses"]:
        lines += wrap(f"{d['defense']}: {d['words']}" + (f", {d['cost']}" if d["cost"] else ""))
        numbers = d["sentence"].split(": ", 1)[1].rsplit(": ", 1)[0]
        for part in numbers.split("; "):
            lines += wrap(part, indent="    ")
    return lines
