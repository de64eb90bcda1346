"""What `crl tune` writes into the run directory, atomically: tune.json (every trial, the
front, the reference points, the recommendation and its fresh-seed confirmation), tune.md (the
same as tables) and pareto.png (test accuracy vs the objective, in the style of the paper's
Figs. 4-5: every trial grey, the Pareto front highlighted, CE and the reference defenses at
their defaults as marked points)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crl.core.utils import atomic_path, write_json_atomic, write_text_atomic
from crl.tune.evaluate import POOLED, Point
from crl.tune.study import format_params

METRIC_WORDS = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR at 1% FPR (%)",
                "tpr_at_0.1pct_fpr": "TPR at 0.1% FPR (%)"}


@dataclass
class ConfirmRow:
    label: str
    point: Point
    interval: list[float] | None       # 95% interval of the strongest attack's metric
    accuracy_interval: list[float] | None = None     # 95% interval of test accuracy (samples)
    change: dict[str, Any] | None = None             # strongest attack vs CE, paired (verdict)
    accuracy_change: dict[str, Any] | None = None    # test accuracy vs CE, paired (verdict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "point": self.point.to_dict(), "interval": self.interval,
                "accuracy_interval": self.accuracy_interval, "change": self.change,
                "accuracy_change": self.accuracy_change}


@dataclass
class TuneResult:
    meta: dict[str, Any]               # command, setup, version, machine, date, seconds
    metric: str
    searched: list[str]                # the searched parameter names
    search_attacks: list[str]
    trials: list[dict[str, Any]]       # every trial of the study
    front: list[int]                   # trial numbers on the Pareto front
    references: dict[str, Point]       # label -> Point on the search seeds
    max_accuracy_drop: float
    recommended: tuple[int, Point] | None = None
    confirm: list[ConfirmRow] = field(default_factory=list)
    confirm_seeds: list[int] = field(default_factory=list)
    confirm_attacks: list[str] = field(default_factory=list)

    def points(self, numbers: list[int] | None = None) -> list[tuple[int, Point]]:
        """(number, Point) of the completed trials (or of `numbers`)."""
        keep = None if numbers is None else set(numbers)
        return [(t["number"], Point.from_dict(t["point"])) for t in self.trials
                if t["state"] == "COMPLETE" and (keep is None or t["number"] in keep)]

    def to_dict(self) -> dict[str, Any]:
        rec = self.recommended
        return {**self.meta, "metric": self.metric, "searched": self.searched,
                "search_attacks": self.search_attacks, "trials": self.trials,
                "front": self.front, "max_accuracy_drop": self.max_accuracy_drop,
                "references": {k: p.to_dict() for k, p in self.references.items()},
                "best_within_budget": None if rec is None else {"trial": rec[0],
                                                                "point": rec[1].to_dict()},
                "recommendation": dict(zip(("status", "words"), status(self))),
                "confirm": {"seeds": self.confirm_seeds, "attacks": self.confirm_attacks,
                            "rows": [r.to_dict() for r in self.confirm]}}


#: status(r)[0]: whether the most private trial within the budget is recommended
RECOMMENDED, NO_TRIAL, NO_GAIN, WITHIN_NOISE = ("recommended", "no trial within the budget",
                                                "no gain", "within noise on fresh seeds")


def status(r: TuneResult) -> tuple[str, str]:
    """(status, one sentence): a trial is "recommended" only when it is more private than CE on
    the search seeds and, on the fresh seeds, its strongest attack's paired change against CE
    lies wholly below 0 (without a paired change: its interval wholly below CE's)."""
    drop, none = _points(r.max_accuracy_drop), "no setting beats ce within the budget"
    if r.recommended is None:
        return NO_TRIAL, f"{none}: no completed trial is within {drop} of CE's test accuracy"
    (n, p), ce = r.recommended, r.references["ce"]
    search = f"{fmt(r.metric, p.objective)} vs CE's {fmt(r.metric, ce.objective)}"
    if p.objective >= ce.objective:
        return NO_GAIN, (f"{none}: the most private trial within {drop} of CE's test accuracy, "
                         f"trial {n}, is no more private than CE on the search seeds ({search})")
    if not _confirmed(r):
        return WITHIN_NOISE, (f"{none} beyond noise: trial {n} is more private than CE on the "
                              f"search seeds ({search}), but on the fresh seeds "
                              f"{r.confirm_seeds} its change is within noise")
    return RECOMMENDED, (f"recommended: trial {n}, more private than CE on the search seeds "
                         f"({search}) and on the fresh seeds {r.confirm_seeds}")


def _confirmed(r: TuneResult) -> bool:
    rows = {row.label: row for row in r.confirm}
    ours = rows.get(f"{r.meta['setup']['defense']} (trial {r.recommended[0]})")
    if ours is None or "ce" not in rows:
        return False
    if ours.change is not None:
        return ours.change["ci"][1] < 0
    ce = rows["ce"].interval
    return ours.interval is not None and ce is not None and ours.interval[1] < ce[0]


def write_outputs(out: Path, result: TuneResult) -> None:
    write_json_atomic(out / "tune.json", result.to_dict())
    write_text_atomic(out / "tune.md", "\n".join(markdown(result)) + "\n")
    plot_front(out / "pareto.png", result)


def fmt(metric: str, v: float | None) -> str:
    """AUC with 3 decimals; TPRs in percent with 1."""
    if v is None:
        return "n/a"
    return f"{v:.3f}" if metric == "auc" else f"{100 * v:.1f}"


def _acc(p: Point) -> str:
    return f"{100 * p.test_acc:.1f}"


def _with_interval(metric: str, v: float, interval: list[float] | None) -> str:
    if interval is None:
        return fmt(metric, v)
    return f"{fmt(metric, v)} [{fmt(metric, interval[0])}, {fmt(metric, interval[1])}]"


def markdown(r: TuneResult) -> list[str]:
    """tune.md, as lines."""
    m = r.meta
    lines = [(f"# crl tune: {m['setup']['defense']}, objective {m['setup']['objective']} "
              f"(the strongest attack's {METRIC_WORDS[r.metric]})"), "",
             f"Command: `{m['command']}`", "",
             (f"Machine: {m['machine']}; date {m['date']}; wall time {m['seconds']['run']} s "
              f"this run, {m['seconds']['total']} s for the study so far."), "",
             (f"Setup (a rerun must match it to continue the study): "
              f"`{json.dumps(m['setup'], sort_keys=True)}`"), ""]
    lines += _recommendation(r) + _confirm_table(r) + _front_table(r)
    lines += _reference_table(r) + _failed(r) + _every_trial(r)
    return lines


def _recommendation(r: TuneResult) -> list[str]:
    ce = r.references["ce"]
    drop = _points(r.max_accuracy_drop)
    head = (f"## Recommendation (the most private trial with test accuracy at least CE's "
            f"{_acc(ce)}% minus {drop}, if it beats CE)")
    words = status(r)[1]
    lines = [head, "", f"**{words[0].upper() + words[1:]}.**", ""]
    if r.recommended is None:
        return lines
    n, p = r.recommended
    return lines + [
        f"Trial {n}: {format_params({k: p.params[k] for k in r.searched})}.", "",
        (f"On the search seeds {p.seeds} (the front is chosen on them, so this is "
         f"optimistic): test {_acc(p)}%, {_strongest(r, p)}; CE: test {_acc(ce)}%, "
         f"{_strongest(r, ce)}."), ""]


def _points(drop: float) -> str:
    return f"{100 * drop:g} point" + ("" if 100 * drop == 1 else "s")


def _strongest(r: TuneResult, p: Point) -> str:
    return f"strongest attack {p.strongest}, {METRIC_WORDS[r.metric]} {fmt(r.metric, p.objective)}"


def _confirm_table(r: TuneResult) -> list[str]:
    if not r.confirm:
        return []
    attacks = list(r.confirm[0].point.attacks)
    lines = [(f"## Fresh seeds {r.confirm_seeds} (not used in the search), attacks "
              f"{', '.join(r.confirm_attacks)}"), "",
             (f"{METRIC_WORDS[r.metric]} per attack (mean over seeds); the strongest with a 95% "
              "interval over seeds and samples; test accuracy, mean over seeds, with a 95% "
              "bootstrap interval over test samples; the changes against CE are paired (same "
              "seeds and samples) with 95% intervals, as in crl audit's verdict."), "",
             "| setting | params | train % | test % | " + " | ".join(attacks)
             + " | strongest | vs CE: strongest | vs CE: test (points) |",
             "|" + "---|" * (len(attacks) + 7)]
    for row in r.confirm:
        p = row.point
        lines.append(f"| {row.label} | {_searched(r, p)} | {100 * p.train_acc:.1f} | "
                     f"{_acc_interval(p, row)} | " + " | ".join(fmt(r.metric, p.attacks.get(a))
                                                               for a in attacks)
                     + f" | {p.strongest} {_with_interval(r.metric, p.objective, row.interval)}"
                     + f" | {_change(row.change)} | {_accuracy_change(row.accuracy_change)} |")
    lines += ["", *_same_attacks_line(r), ""]
    return lines


def _same_attacks_line(r: TuneResult) -> list[str]:
    """The fresh-seed objective restricted to the search's attacks (the number to set against
    the search's), when the confirm stage ran all of them."""
    if r.recommended is None or not set(r.search_attacks) <= set(r.confirm_attacks):
        return []
    cells = []
    for row in r.confirm:
        a = row.point.strongest_of(r.search_attacks)
        cells.append(f"{row.label} {a} {fmt(r.metric, row.point.attacks[a])}")
    return [(f"With the search's attacks only, the strongest on the fresh seeds: "
             f"{'; '.join(cells)}.")]


def _acc_interval(p: Point, row: ConfirmRow) -> str:
    if row.accuracy_interval is None:
        return _acc(p)
    lo, hi = row.accuracy_interval
    return f"{_acc(p)} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _change(c: dict[str, Any] | None) -> str:
    """The paired change of the strongest attack against CE (crl.audit.verdict's words)."""
    if c is None:
        return "-"
    from crl.audit.verdict import change_text

    return change_text(c)


def _accuracy_change(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    lo, hi = a["ci"]
    return f"{100 * a['change']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _searched(r: TuneResult, p: Point) -> str:
    if p.defense != r.meta["setup"]["defense"]:
        return "defaults"
    return format_params({k: p.params[k] for k in r.searched})


def _point_table(r: TuneResult, rows: list[tuple[str, Point]], first: str) -> list[str]:
    lines = [(f"| {first} | params | train % | test % | strongest | "
              f"{METRIC_WORDS[r.metric]} |"), "|---|---|---|---|---|---|"]
    for label, p in rows:
        lines.append(f"| {label} | {_searched(r, p)} | {100 * p.train_acc:.1f} | {_acc(p)} | "
                     f"{p.strongest} | {fmt(r.metric, p.objective)} |")
    return lines


def _front_table(r: TuneResult) -> list[str]:
    front = sorted(r.points(r.front), key=lambda item: item[1].objective)
    source = (" (pooled leave-one-out scores: one target cannot resolve this FPR)"
              if front and front[0][1].source == POOLED else "")
    return [f"## Pareto front: {len(front)} of {len(r.points())} completed trials{source}", "",
            *_point_table(r, [(str(n), p) for n, p in front], "trial"), ""]


def _reference_table(r: TuneResult) -> list[str]:
    rows = list(r.references.items())
    return ["## Reference points (search seeds, each at its defaults)", "",
            *_point_table(r, rows, "setting"), ""]


def _failed(r: TuneResult) -> list[str]:
    failed = [t for t in r.trials if t["state"] == "FAIL"]
    if not failed:
        return []
    return [f"## Failed trials ({len(failed)})", "",
            *(f"- {t['number']}: {'; '.join(t['failed'].split('; ')[:2])}" for t in failed),
            ""]


def _every_trial(r: TuneResult) -> list[str]:
    lines = ["## Every trial", "", ("| trial | state | params | test % | strongest | "
              f"{METRIC_WORDS[r.metric]} |"), "|---|---|---|---|---|---|"]
    for t in r.trials:
        p = Point.from_dict(t["point"]) if t["point"] else None
        cells = ([_acc(p), p.strongest, fmt(r.metric, p.objective)] if p else ["-", "-", "-"])
        lines.append(f"| {t['number']} | {t['state']} | {format_params(t['searched'])} | "
                     + " | ".join(cells) + " |")
    return lines


def plot_front(path: Path, r: TuneResult) -> None:
    """Test accuracy vs the objective: trials grey, the front highlighted, references marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 if r.metric == "auc" else 100.0
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    _scatter_trials(ax, r, scale)
    styles = iter(zip(["D", "^", "v", "P", "X", "h", "<", ">"], [f"C{i}" for i in range(1, 9)]))
    for label, p in r.references.items():
        marker, color = ("*", "k") if label == "ce" else next(styles)
        ax.scatter([scale * p.objective], [100 * p.test_acc], zorder=5, marker=marker,
                   s=130 if label == "ce" else 60, color=color, label=f"{label} at its defaults")
    if r.recommended is not None:
        n, p = r.recommended
        state = status(r)[0]
        ax.scatter([scale * p.objective], [100 * p.test_acc], s=220, facecolors="none",
                   edgecolors="red", linewidths=1.8, zorder=6,
                   label=f"trial {n}: " + ("recommended" if state == RECOMMENDED
                                           else f"best within the budget, {state}"))
    ax.set_xlabel(f"strongest attack's {METRIC_WORDS[r.metric]} (lower = more private)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{r.meta['setup']['defense']}: {len(r.trials)} trials, seeds "
                 f"{r.meta['setup']['recipe']['seeds']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _scatter_trials(ax, r: TuneResult, scale: float) -> None:
    """Completed trials grey, the front as a step line; trials failed at chance are counted in
    the legend, not drawn (their AUCs near 0.5 say nothing about privacy)."""
    done = r.points()
    failed = sum(t["state"] == "FAIL" for t in r.trials)
    ax.scatter([scale * p.objective for _, p in done], [100 * p.test_acc for _, p in done],
               s=14, color="0.6", label=f"trials ({len(done)} completed"
               + (f"; {failed} failed, not shown)" if failed else ")"))
    front = sorted(r.points(r.front), key=lambda item: item[1].objective)
    ax.plot([scale * p.objective for _, p in front], [100 * p.test_acc for _, p in front],
            "o-", color="C0", ms=5, drawstyle="steps-post", label="Pareto front (trial numbers)")
    for n, p in front:                  # the numbers of tune.md, tune.json and the console
        ax.annotate(str(n), (scale * p.objective, 100 * p.test_acc), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", color="C0")
