"""Run a privacy-utility sweep (experiments/sweeps/*.yaml): one `crl audit` per defense setting.

    python benchmarks/sweep.py experiments/sweeps/fig4_cifar10_resnet18.yaml
    python benchmarks/sweep.py SWEEP --print                  # the crl commands only
    python benchmarks/sweep.py SWEEP -- --epochs 1 --subset 400  # extra flags for every audit
    python benchmarks/sweep.py experiments/sweeps/fronts_cifar10_cnn.yaml --tier 1 \
        --dataset imagefolder:PATH --subset 20000 --out runs/fronts    # one tier of a tiered sweep

A sweep YAML names a base recipe (`base`, relative to the sweep file), AuditConfig fields
replacing the base's (`config`), a run folder (`out`) and, per defense, a list of parameter
settings (`variants`, each defense's in the order of its privacy knob). Each setting becomes a
recipe OUT/recipes/<defense>-<i>.yaml (the base with `defenses: [<defense>]`, the setting merged
over the base's `set` for that defense and `out: OUT/<defense>-<i>`) and runs as
`crl audit --config OUT/recipes/<defense>-<i>.yaml` (in this process, through crl.cli.main).
A rerun skips settings whose run folder holds a complete run of the same resolved config
(its manifest); `--resume` continues an interrupted one (the model cache serves its models).

Optional `tiers` (chosen with `--tier N`): a first-pass tier runs the settings of its `defenses`;
a second-pass tier (`from: [tiers]`, `nearest: k`) runs, for each defense of those tiers (or of
its own `defenses`), the k settings whose first-pass test accuracy lies nearest CE's, with its
`config` (e.g. other attacks, more seeds) over the setting's recipe, in OUT/tier<N>/<setting>.
The chosen settings are named on the console and in OUT/recipes/tier<N>.txt.

Then, from every finished run: OUT/summary.md (every point: accuracies with 95% intervals,
each attack's AUC, the strongest attack by AUC and by TPR at 1% FPR with intervals),
OUT/summary.png (the paper's Fig. 4: test accuracy against the strongest attack's AUC and TPR
at 1% FPR, one line per defense, CE marked) and OUT/answer.md (per attack family, at matched
test accuracy: which defense leaks least, by how much, within noise or not).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crl.audit.verdict import strongest
from crl.config import FIELDS, load_yaml_recipe
from crl.core.errors import CRLError
from crl.core.utils import atomic_path, write_text_atomic

KEYS = ("base", "config", "out", "variants", "tiers")
TIER_KEYS = ("defenses", "from", "nearest", "config")
MARKERS = "osD^vPX<>p"             # one marker per defense in the figure (CE: a star)
Z95 = 1.959964                  # two-sided 95% normal quantile (accuracy intervals)
MATCH_POINTS = 1.0              # "matched accuracy": within this many points of test accuracy
ANY = "any attack that ran at every point compared"
METRICS = {"auc": "AUC", "tpr_at_1pct_fpr": "TPR at 1% FPR"}
FAMILIES = {                    # attack family -> its attacks (crl list)
    "threshold": ("loss", "confidence", "entropy", "mentr", "gradx"),
    "NN": ("nn",),
    "LiRA/RMIA": ("lira", "lira_offline", "rmia"),
    "label-only": ("gap", "augment", "boundary"),
    "white-box boundary (an upper bound, not label-only)": ("boundary_whitebox",),
}


@dataclass(frozen=True)
class Variant:
    """One defense setting of a sweep: its name (`<defense>-<i>`), defense and parameters."""

    name: str
    defense: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Tier:
    """A tier of a sweep. First pass (`sources` empty): the settings of `defenses`. Second pass:
    per defense of the `sources` tiers (restricted to `defenses` when given), the `nearest`
    settings nearest CE's test accuracy, with `config` over their recipes."""

    id: int
    defenses: tuple[str, ...] | None
    sources: tuple[int, ...]
    nearest: int
    config: dict[str, Any]

    @property
    def second_pass(self) -> bool:
        return bool(self.sources)


@dataclass(frozen=True)
class Sweep:
    """A checked sweep file: its base recipe, the fields replacing the base's, the run folder,
    the settings and the tiers."""

    path: Path
    base: Path
    config: dict[str, Any]
    out: Path
    variants: tuple[Variant, ...]
    tiers: dict[int, Tier] = dataclasses.field(default_factory=dict)

    def recipe(self, variant: Variant, tier: Tier | None = None) -> dict[str, Any]:
        """The AuditConfig values of one setting: base, then `config`, then a second-pass tier's
        `config`, then the setting."""
        extra = tier.config if tier is not None and tier.second_pass else {}
        values = {**load_yaml_recipe(self.base), **self.config, **extra}
        base_set = _mapping(values.get("set") or {}, f"{self.base}: set")
        owners = {k: v for k, v in base_set.items() if k in (values.get("attacks") or [])}
        owners[variant.defense] = {**base_set.get(variant.defense, {}), **variant.params}
        values.update(defenses=[variant.defense], set=owners,
                      out=str(self.folder(variant, tier)))
        return values

    def folder(self, variant: Variant, tier: Tier | None = None) -> Path:
        """OUT/<setting> (first pass), OUT/tier<N>/<setting> (second pass)."""
        if tier is not None and tier.second_pass:
            return self.out / f"tier{tier.id}" / variant.name
        return self.out / variant.name

    def recipe_path(self, variant: Variant, tier: Tier | None = None) -> Path:
        return self.folder(variant, tier).parent / "recipes" / f"{variant.name}.yaml"

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CRLError(f"{where} = {value!r}: expected a mapping of names to values")
    return value


def _variants(value: Any, where: str) -> tuple[Variant, ...]:
    out = []
    for defense, settings in _mapping(value, where).items():
        if not isinstance(settings, list) or not settings:
            raise CRLError(f"{where}.{defense} = {settings!r}: expected a non-empty list of "
                           "parameter mappings ([{}] for the defaults)")
        for i, params in enumerate(settings):
            out.append(Variant(f"{defense}-{i}", defense,
                               dict(_mapping(params, f"{where}.{defense}[{i}]"))))
    if not out:
        raise CRLError(f"{where} = {value!r}: expected at least one defense")
    return tuple(out)


def _config(value: Any, where: str) -> dict[str, Any]:
    config = dict(_mapping(value or {}, where))
    bad = sorted(set(config) - FIELDS)
    if bad:
        raise CRLError(f"{where}.{bad[0]} = {config[bad[0]]!r}: expected an AuditConfig field "
                       f"({', '.join(sorted(FIELDS))})")
    return config


def _names(value: Any, where: str, known: set) -> tuple:
    if not isinstance(value, list) or not value or not set(value) <= known:
        raise CRLError(f"{where} = {value!r}: expected a non-empty list of {sorted(known)}")
    return tuple(value)


def _tier(key: Any, value: Any, defenses: set[str], earlier: set[int]) -> Tier:
    where = f"tiers.{key}"
    if not isinstance(key, int) or isinstance(key, bool) or key < 1:
        raise CRLError(f"tiers: key {key!r}: expected a tier number >= 1")
    data = dict(_mapping(value, where))
    unknown = sorted(set(data) - set(TIER_KEYS))
    if unknown:
        raise CRLError(f"{where}.{unknown[0]}: expected keys among {', '.join(TIER_KEYS)}")
    names = _names(data["defenses"], f"{where}.defenses", defenses) if "defenses" in data \
        else None
    sources = _names(data["from"], f"{where}.from", earlier) if "from" in data else ()
    nearest = data.get("nearest", 2 if sources else 0)
    if sources and (not isinstance(nearest, int) or isinstance(nearest, bool) or nearest < 1):
        raise CRLError(f"{where}.nearest = {nearest!r}: expected an integer >= 1")
    if not sources and (names is None or "nearest" in data or "config" in data):
        raise CRLError(f"{where}: expected `defenses` (a first pass) or `from` and `nearest` "
                       "(a second pass over earlier tiers)")
    return Tier(key, names, sources, nearest, _config(data.get("config"), f"{where}.config"))


def _tiers(value: Any, variants: tuple[Variant, ...]) -> dict[int, Tier]:
    defenses = {v.defense for v in variants}
    tiers: dict[int, Tier] = {}
    for key, data in (value or {}).items():     # a second pass chooses from first passes
        tiers[key] = _tier(key, data, defenses, {k for k, t in tiers.items() if not t.sources})
    return tiers


def load_sweep(path: str | Path) -> Sweep:
    """A sweep YAML, checked: known keys, an existing base recipe, settings as mappings."""
    path = Path(path)
    if not path.is_file():
        raise CRLError(f"sweep {path}: no such file")
    try:
        data = _mapping(yaml.safe_load(path.read_text()) or {}, f"sweep {path}")
    except yaml.YAMLError as e:
        raise CRLError(f"sweep {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    unknown = sorted(set(data) - set(KEYS))
    if unknown or "base" not in data or "variants" not in data:
        raise CRLError(f"sweep {path}: keys {sorted(data)}: expected base, variants and "
                       "optionally config, out, tiers")
    base = path.parent / str(data["base"])
    if not base.is_file():
        raise CRLError(f"sweep {path}: base = {data['base']!r}: expected a recipe file "
                       "relative to the sweep file")
    config = _config(data.get("config"), f"sweep {path}: config")
    variants = _variants(data["variants"], "variants")
    if not isinstance(data.get("tiers") or {}, dict):
        raise CRLError(f"sweep {path}: tiers = {data['tiers']!r}: expected a mapping of tier "
                       "numbers to tiers")
    return Sweep(path, base, config, Path(str(data.get("out") or f"runs/{path.stem}")),
                 variants, _tiers(data.get("tiers"), variants))


def with_options(sweep: Sweep, *, dataset: str | None = None, subset: int | None = None,
                 out: str | None = None) -> Sweep:
    """`sweep` with the command line's --dataset, --subset and --out (None: the file's)."""
    config = dict(sweep.config)
    if dataset is not None:
        config["dataset"] = dataset
    if subset is not None:
        config["subset"] = subset
    return dataclasses.replace(sweep, config=config,
                               out=Path(out) if out is not None else sweep.out)


# --------------------------------------------------------------------------- running

def first_pass(sweep: Sweep, tier: Tier | None) -> list[Variant]:
    """The settings a first-pass tier runs (every setting without tiers)."""
    if tier is None:
        return list(sweep.variants)
    return [v for v in sweep.variants if v.defense in tier.defenses]


def choose_nearest(accuracy: dict[str, tuple[str, float]], ce_accuracy: float, k: int,
                   defenses: list[str] | None = None) -> list[str]:
    """Per defense (in order of first appearance), the k settings whose test accuracy lies
    nearest `ce_accuracy`; `accuracy` maps a setting's name to (defense, test accuracy). Ties:
    the setting listed first."""
    order = list(dict.fromkeys(d for d, _ in accuracy.values()))
    chosen = []
    for defense in (d for d in order if defenses is None or d in defenses):
        names = [n for n, (d, _) in accuracy.items() if d == defense]
        names.sort(key=lambda n: abs(accuracy[n][1] - ce_accuracy))   # stable: ties keep order
        chosen += names[:k]
    return chosen


def read_rows(folder: Path) -> list[dict[str, Any]]:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def second_pass(sweep: Sweep, tier: Tier) -> tuple[list[Variant], str]:
    """The settings a second-pass tier runs, chosen from its source tiers' first-pass results,
    and a line saying what was chosen and why; a CRLError while CE has no results."""
    pool = [v for t in tier.sources for v in first_pass(sweep, sweep.tiers[t])]
    accuracy = {v.name: (v.defense, _mean([r["test_acc"] for r in rows]))
                for v in pool if (rows := read_rows(sweep.folder(v)))}
    ce = [a for d, a in accuracy.values() if d == "ce"]
    if not ce:
        raise CRLError(f"tier {tier.id} chooses the settings nearest CE's test accuracy, and no "
                       f"ce setting of tiers {list(tier.sources)} has results under {sweep.out}: "
                       f"expected --tier {tier.sources[0]} first")
    wanted = list(tier.defenses) if tier.defenses else None
    names = choose_nearest(accuracy, ce[0], tier.nearest, wanted)
    missing = sorted(set(wanted or [v.defense for v in pool]) - {accuracy[n][0] for n in names})
    text = (f"tier {tier.id}: the {tier.nearest} settings per defense nearest CE's test "
            f"accuracy ({100 * ce[0]:.2f}%): " +
            ", ".join(f"{n} ({100 * accuracy[n][1]:.2f}%)" for n in names))
    if missing:
        text += f"; no first-pass results yet for {', '.join(missing)}"
    return [sweep.variant(n) for n in names], text


def command(recipe: Path, extra: list[str]) -> list[str]:
    return ["audit", "--config", str(recipe), *extra]


def done(recipe: Path, extra: list[str]) -> bool:
    """Whether the run folder of `recipe` holds a complete run of exactly this resolved config
    (its manifest; the options that do not change results, e.g. --resume, aside)."""
    from crl.cli import build_parser, config_from_args
    from crl.core.manifest import config_identity
    from crl.rundir import found_run

    cfg = config_from_args(build_parser().parse_args(command(recipe, extra))).resolved()
    found = found_run(cfg.out)
    return (found is not None and found.state == "complete" and found.command == "audit"
            and found.config == config_identity(cfg.to_dict()))


def planned(sweep: Sweep, tier: Tier | None) -> tuple[list[Variant], str | None]:
    """The settings of a tier (all without tiers) and, for a second pass, the line naming them."""
    if tier is not None and tier.second_pass:
        return second_pass(sweep, tier)
    return first_pass(sweep, tier), None


def write_recipes(sweep: Sweep, tier: Tier | None = None,
                  variants: list[Variant] | None = None) -> list[Path]:
    """Each setting's recipe as YAML under its recipes/ folder (atomic); their paths."""
    paths = []
    for v in first_pass(sweep, tier) if variants is None else variants:
        p = sweep.recipe_path(v, tier)
        write_text_atomic(p, yaml.safe_dump(sweep.recipe(v, tier), sort_keys=False))
        paths.append(p)
    return paths


def run(sweep: Sweep, extra: list[str], *, tier: Tier | None = None, resume: bool = False,
        echo=print) -> int:
    """Every setting of the tier not yet done, through crl.cli.main; the first non-zero exit
    status stops."""
    from crl.cli import main as crl_main

    variants, chosen = planned(sweep, tier)
    if chosen:
        echo(chosen)
        write_text_atomic(sweep.out / "recipes" / f"tier{tier.id}.txt", chosen + "\n")
    for v, recipe in zip(variants, write_recipes(sweep, tier, variants)):
        if done(recipe, extra):
            echo(f"[{v.name}] done already: {sweep.folder(v, tier)}/results.json")
            continue
        args = command(recipe, extra + (["--resume"] if resume else []))
        echo("crl " + shlex.join(args))
        rc = crl_main(args)
        if rc != 0:
            echo(f"sweep stopped at {v.name}: crl exited with status {rc}")
            return rc
    return 0


def print_commands(sweep: Sweep, extra: list[str], tier: Tier | None) -> None:
    """Write the tier's recipes and print its crl commands; a second pass whose first-pass
    results are missing prints why instead."""
    try:
        variants, chosen = planned(sweep, tier)
    except CRLError as e:
        print(f"# {e}")
        return
    if chosen:
        print(f"# {chosen}")
    for recipe in write_recipes(sweep, tier, variants):
        print("crl " + shlex.join(command(recipe, extra)))


# --------------------------------------------------------------------------- the points

@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval (lo, hi None when there is none). One seed: the run's
    interval (bootstrap for attack metrics, binomial for accuracy); several seeds: the mean,
    and from the lowest lower to the highest upper bound of the seeds' intervals (their spread
    and their noise)."""

    value: float
    lo: float | None
    hi: float | None

    def apart(self, other: Estimate) -> bool:
        """Whether the two intervals do not overlap (False when one has none)."""
        if None in (self.lo, self.hi, other.lo, other.hi):
            return False
        return self.hi < other.lo or other.hi < self.lo


def estimate(values: list[tuple[float, list[float] | None]]) -> Estimate:
    """Seeds' (value, interval) pairs as one Estimate (the Estimate docstring's rule)."""
    mean = _mean([v for v, _ in values])
    if any(ci is None for _, ci in values):
        return Estimate(mean, None, None)
    return Estimate(mean, min(ci[0] for _, ci in values), max(ci[1] for _, ci in values))


def accuracy_interval(p: float, n: int) -> list[float]:
    """95% normal-approximation binomial interval of an accuracy p measured on n samples."""
    half = Z95 * math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")
    return [p - half, p + half]


@dataclass(frozen=True)
class Point:
    """One setting of a front: its seeds' rows merged over every tier that audited it."""

    name: str
    defense: str
    params: dict[str, Any]
    seeds: tuple[int, ...]
    train_acc: float
    test_acc: Estimate
    metrics: dict[str, dict[str, Estimate]]    # attack -> metric -> Estimate
    at_chance: bool = False                    # a seed's target carries the chance warning

    def strongest(self, metric: str, attacks: tuple[str, ...] | None = None
                  ) -> tuple[str, Estimate] | None:
        """The strongest attack by `metric` (crl.audit.verdict.strongest over the attacks' seed
        means; only `attacks` when given) and its Estimate; None when none has the metric."""
        values = {a: m[metric].value if metric in m else None for a, m in self.metrics.items()
                  if attacks is None or a in attacks}
        best = strongest(values)
        return None if best is None else (best, self.metrics[best][metric])


def merge_rows(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """results.json rows of one setting from several tiers, by seed: the first row of a seed
    gives its accuracies, every row adds its attacks (the same target, from the model cache)."""
    seeds: dict[int, dict[str, Any]] = {}
    for r in rows:
        s = seeds.setdefault(r["seed"], {**r, "attacks": {}})
        for name, a in r["attacks"].items():
            s["attacks"].setdefault(name, a)
    return seeds


def point_of(variant: Variant, rows: list[dict[str, Any]]) -> Point | None:
    """The Point of a setting from its results.json rows (None: no row)."""
    seeds = merge_rows(rows)
    if not seeds:
        return None
    acc = estimate([(r["test_acc"], accuracy_interval(r["test_acc"], r["n_nonmembers"]))
                    for r in seeds.values()])
    attacks = sorted({a for r in seeds.values() for a in r["attacks"]})
    metrics: dict[str, dict[str, Estimate]] = {}
    for a in attacks:
        for m in METRICS:
            got = [(r["attacks"][a].get(m), r["attacks"][a].get(f"{m}_ci"))
                   for r in seeds.values() if a in r["attacks"]]
            if got and all(v is not None for v, _ in got):
                metrics.setdefault(a, {})[m] = estimate(got)
    return Point(variant.name, variant.defense, variant.params, tuple(sorted(seeds)),
                 _mean([r["train_acc"] for r in seeds.values()]), acc, metrics,
                 any("warning" in r for r in seeds.values()))


def collect_points(sweep: Sweep) -> list[Point]:
    """Every setting with results, in the sweep's order, merged over all tiers' run folders."""
    seconds = [t for t in sweep.tiers.values() if t.second_pass]
    points = []
    for v in sweep.variants:
        rows = read_rows(sweep.folder(v))
        for t in seconds:
            rows += read_rows(sweep.folder(v, t))
        p = point_of(v, rows)
        if p is not None:
            points.append(p)
    return points


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --------------------------------------------------------------------------- the summary

def _fmt(e: Estimate | None, metric: str = "auc") -> str:
    if e is None:
        return "-"
    k, f, pct = (1.0, ".3f", "") if metric == "auc" else (100.0, ".1f", "%")
    ci = "" if e.lo is None else f" [{k * e.lo:{f}}, {k * e.hi:{f}}]"
    return f"{k * e.value:{f}}{pct}{ci}"


def _strongest_cell(p: Point, metric: str) -> str:
    best = p.strongest(metric)
    return "-" if best is None else f"{best[0]} {_fmt(best[1], metric)}"


def summary_table(points: list[Point]) -> str:
    """Every point: seeds, accuracies, each attack's AUC, the strongest by AUC and by TPR at
    1% FPR (markdown)."""
    attacks = sorted({a for p in points for a in p.metrics})
    head = ["setting", "defense", "params", "seeds", "train %", "test acc [95%]", *attacks,
            "strongest AUC [95%]", "strongest TPR@1%FPR [95%]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        params = ", ".join(f"{k} {v}" for k, v in p.params.items()) or "-"
        cells = [p.name + (" (at chance)" if p.at_chance else ""), p.defense, params,
                 ",".join(map(str, p.seeds)),
                 f"{100 * p.train_acc:.1f}", _fmt(p.test_acc, "acc"),
                 *(f"{p.metrics[a]['auc'].value:.3f}" if "auc" in p.metrics.get(a, {}) else "-"
                   for a in attacks),
                 _strongest_cell(p, "auc"), _strongest_cell(p, "tpr_at_1pct_fpr")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_NOTE = (
    "Intervals are 95%: for one seed the run's own (bootstrap over samples for the attacks, "
    "binomial for test accuracy); for several seeds the mean, from the lowest lower to the "
    "highest upper bound of the seeds' intervals. \"Strongest\" is "
    "crl.audit.verdict.strongest over "
    "the attacks that ran at that point (the points of the second-pass tiers had more); two "
    "points are compared on the attacks that ran at both. An attack that ran on fewer of a "
    "point's seeds (second-pass tiers: seed 0) is the mean over those seeds.\n")


def plot_fronts(path: Path, points: list[Point]) -> None:
    """Fig. 4: test accuracy against the strongest attack's AUC (left) and TPR at 1% FPR
    (right), each point with its intervals, one line per defense in the sweep's order of its
    settings, CE as a star. The lines use the first-pass attacks (threshold and NN, run at
    every point, so every point is measured alike); where second-pass attacks (RMIA,
    label-only) also ran, a ring joined by a dotted line marks the strongest counting them.
    A point whose target is at chance is left out (summary.md and answer.md name it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = tuple(a for fam in ("threshold", "NN") for a in FAMILIES[fam])
    defenses = list(dict.fromkeys(p.defense for p in points))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    for ax, metric in zip(axes, METRICS):
        scale = 1.0 if metric == "auc" else 100.0
        for k, defense in enumerate(defenses):
            pts = [(p, best[1]) for p in points if p.defense == defense and not p.at_chance
                   and (best := p.strongest(metric, first)) is not None]
            if not pts:
                continue
            xs = [scale * b.value for _, b in pts]
            ys = [100 * p.test_acc.value for p, _ in pts]
            xerr = [[scale * (b.value - b.lo) if b.lo is not None else 0 for _, b in pts],
                    [scale * (b.hi - b.value) if b.hi is not None else 0 for _, b in pts]]
            yerr = [[100 * (p.test_acc.value - p.test_acc.lo) for p, _ in pts],
                    [100 * (p.test_acc.hi - p.test_acc.value) for p, _ in pts]]
            ce = defense == "ce"
            colour = f"C{k % 10}"
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, capsize=2, label=defense,
                        marker="*" if ce else MARKERS[k % len(MARKERS)],
                        markersize=12 if ce else 5, color=colour,
                        linewidth=2.2 if defense == "crl" else 1.0,
                        linestyle="-" if k < 10 else "--")
            for (p, _), x, y in zip(pts, xs, ys):
                if set(p.metrics) - set(first) and (every := p.strongest(metric)) is not None:
                    ring = scale * every[1].value
                    ax.plot([x, ring], [y, y], linestyle=":", linewidth=1, color=colour)
                    ax.scatter([ring], [y], s=110, facecolors="none", edgecolors=colour,
                               linewidths=1.2)
        unit = "" if metric == "auc" else " (%)"
        ax.set_xlabel(f"strongest attack's {METRICS[metric]}{unit} (lower is more private)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 6),
                   frameon=False)
    fig.suptitle("privacy-utility fronts: strongest threshold or NN attack (run at every point)\n"
                 "ring: strongest counting RMIA / label-only attacks where they also ran; "
                 "targets at chance left out",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * (max(len(labels) - 1, 0) // 6), 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the answer

Leak = tuple[Point, str, Estimate]          # a point, its strongest attack, that attack's value


def _leak(p: Point, metric: str, attacks: tuple[str, ...] | None) -> Leak | None:
    best = p.strongest(metric, attacks)
    return None if best is None else (p, *best)


def _acc(p: Point) -> str:
    return f"{100 * p.test_acc.value:.1f}%"


def _leak_text(leak: Leak, metric: str) -> str:
    p, attack, e = leak
    chance = ", target at chance" if p.at_chance else ""
    return f"{p.name} ({_acc(p)} test{chance}): {attack} {METRICS[metric]} {_fmt(e, metric)}"


def _diff(d: float, metric: str) -> str:
    return f"{d:.3f}" if metric == "auc" else f"{100 * d:.1f} points"


def compare_words(a: Leak, b: Leak, metric: str) -> str:
    """How the leaner of `a` and `b` (the lower value; `a` on a tie) compares with the other:
    by how much, within noise or not."""
    lean, other = (a, b) if a[2].value <= b[2].value else (b, a)
    d = _diff(other[2].value - lean[2].value, metric)
    if lean[2].apart(other[2]):
        return f"{lean[0].defense} leaks less than {other[0].defense} by {d} (intervals apart)"
    if None in (lean[2].lo, other[2].lo):
        return (f"{lean[0].defense} is lower than {other[0].defense} by {d}, with no interval "
                "to tell it from noise")
    return (f"{lean[0].defense} and {other[0].defense} are within noise of each other "
            f"(difference {d}, intervals overlap)")


def within_match(accuracy_gap: float) -> bool:
    """Whether a test-accuracy gap (a fraction) is at most MATCH_POINTS points (rounded to
    1e-9 points, so that 0.705 - 0.695 counts as the 1 point it is)."""
    return round(100 * accuracy_gap, 9) <= MATCH_POINTS


def front_leak(leaks: list[Leak], accuracy: float) -> Leak:
    """A front's point at `accuracy`: its least leaky point whose test accuracy is at least
    `accuracy` less MATCH_POINTS points (a more accurate point that leaks less dominates);
    when none comes that close, its most accurate point."""
    reach = [lk for lk in leaks if within_match(accuracy - lk[0].test_acc.value)]
    if not reach:
        return max(leaks, key=lambda lk: lk[0].test_acc.value)
    return min(reach, key=lambda lk: lk[2].value)


def shared_attacks(points: list[Point], attacks: tuple[str, ...] | None) -> tuple[str, ...]:
    """The attacks (of `attacks`, or any) that ran at every one of `points` that ran any of
    them: two points are compared on the same attacks, never one point's strongest of more
    attacks against another's of fewer."""
    ran = [set(p.metrics) & set(attacks or p.metrics) for p in points]
    ran = [r for r in ran if r]
    return tuple(sorted(set.intersection(*ran))) if ran else ()


def leaks_by_defense(points: list[Point], metric: str,
                     attacks: tuple[str, ...] | None) -> dict[str, list[Leak]]:
    """Per defense, the leaks of its points the attacks ran on, each over the attacks that ran
    at all of them (`shared_attacks`)."""
    common = shared_attacks(points, attacks)
    out: dict[str, list[Leak]] = {}
    for p in points:
        if common and (lk := _leak(p, metric, common)) is not None:
            out.setdefault(p.defense, []).append(lk)
    return out


def at_ce_accuracy(points: list[Point], ce: Point, metric: str,
                   attacks: tuple[str, ...] | None) -> list[str]:
    """Which defense leaks least at CE's test accuracy: each front's least leaky point within
    MATCH_POINTS points of it or above, or, when fewer than two defenses come that close, each
    front's most accurate point."""
    near = [front_leak(leaks, ce.test_acc.value)
            for leaks in leaks_by_defense(points, metric, attacks).values()]
    if not near:
        return ["no point has this attack family"]
    close = [lk for lk in near
             if within_match(ce.test_acc.value - lk[0].test_acc.value)]
    matched = len(close) >= 2
    pool = sorted(close if matched else near, key=lambda lk: lk[2].value)
    where = (f"within {MATCH_POINTS:g} point of CE's test accuracy ({_acc(ce)}) or above, "
             "each front's least leaky point"
             if matched else
             f"no two defenses within {MATCH_POINTS:g} point of CE's test accuracy "
             f"({_acc(ce)}); at each front's most accurate point")
    lines = [f"{where}, the least leaky is {pool[0][0].defense}, {_leak_text(pool[0], metric)}"]
    if len(pool) >= 2:
        gap = abs(pool[0][0].test_acc.value - pool[1][0].test_acc.value)
        lines.append(f"next: {pool[1][0].defense}, {_leak_text(pool[1], metric)}: "
                     f"{compare_words(pool[0], pool[1], metric)}"
                     + ("" if within_match(gap) else
                        f"; their test accuracies differ by {100 * gap:.1f} points"))
    lines.append("each front's point at CE's accuracy: " +
                 "; ".join(f"{lk[0].defense} {_leak_text(lk, metric)}" for lk in near))
    return lines


def matched_pairs(points: list[Point], focus: str, metric: str,
                  attacks: tuple[str, ...] | None) -> list[str]:
    """`focus` (e.g. crl) against each other defense where both fronts reach: at the highest
    test accuracy both reach, each front's least leaky point at or above it less MATCH_POINTS
    points (`front_leak`); matched when the two points lie within MATCH_POINTS points."""
    lines = []
    for defense in dict.fromkeys(p.defense for p in points if p.defense != focus):
        pair = leaks_by_defense([p for p in points if p.defense in (focus, defense)],
                                metric, attacks)
        ours, theirs = pair.get(focus), pair.get(defense)
        if not ours or not theirs:
            continue
        level = min(max(lk[0].test_acc.value for lk in side) for side in (ours, theirs))
        a, b = front_leak(ours, level), front_leak(theirs, level)
        gap = abs(a[0].test_acc.value - b[0].test_acc.value)
        head = ("matched" if within_match(gap) else
                f"not matched ({100 * gap:.1f} points of test accuracy apart)")
        lines.append(f"{focus} vs {defense}, {head}, at {100 * level:.1f}% (the highest test "
                     f"accuracy both fronts reach): {_leak_text(a, metric)} against "
                     f"{_leak_text(b, metric)}: {compare_words(a, b, metric)}")
    return lines


def crl_at_ce(points: list[Point], ce: Point) -> list[str]:
    """Whether a CRL setting reaches CE's test accuracy (within MATCH_POINTS points, or above),
    and what it leaks there against CE (the strongest of the attacks that ran at both)."""
    crl = [p for p in points if p.defense == "crl"]
    if not crl:
        return ["no CRL setting has results"]
    reach = [p for p in crl if within_match(ce.test_acc.value - p.test_acc.value)]
    lines = []
    if reach:
        lines.append(f"yes: {', '.join(f'{p.name} ({_acc(p)})' for p in reach)} within "
                     f"{MATCH_POINTS:g} point of CE's {_acc(ce)} or above")
    else:
        best = max(crl, key=lambda p: p.test_acc.value)
        lines.append(f"no: the most accurate CRL setting, {best.name}, reaches {_acc(best)}, "
                     f"{100 * (ce.test_acc.value - best.test_acc.value):.1f} points below "
                     f"CE's {_acc(ce)}")
        reach = [best]
    for p in reach:
        both = shared_attacks([p, ce], None)
        for metric, label in METRICS.items():
            ours, base = _leak(p, metric, both), _leak(ce, metric, both)
            if ours and base:
                lines.append(f"there, {label}: {_leak_text(ours, metric)} against CE "
                             f"{_leak_text(base, metric)}: {compare_words(ours, base, metric)}")
    return lines


def answer_text(points: list[Point], title: str) -> str:
    """answer.md: per attack family and metric, the least leaky defense at CE's accuracy and
    CRL against each defense at matched accuracy; then whether CRL reaches CE's accuracy."""
    ce = next((p for p in points if p.defense == "ce"), None)
    if ce is None:
        raise CRLError("the answer compares at CE's test accuracy: no ce setting has results")
    out = [f"# The matched-accuracy answer: {title}", "",
           f"Generated by benchmarks/sweep.py from the results.json files of the sweep. CE's "
           f"test accuracy: {_acc(ce)} ({ce.name}, seeds {', '.join(map(str, ce.seeds))}). "
           f"Matched: test accuracies within {MATCH_POINTS:g} point. A front at an accuracy is "
           f"its least leaky point at or above that accuracy less {MATCH_POINTS:g} point (a "
           "more accurate point that leaks less dominates). \"Within noise\": the two "
           "95% intervals overlap. Each line names the setting, its test accuracy, the "
           "strongest attack of the family there and its value. " + SUMMARY_NOTE, "",
           "## Does a CRL setting reach CE's accuracy?", ""]
    out += [f"- {line}" for line in crl_at_ce(points, ce)]
    families: dict[str, tuple[str, ...] | None] = {**FAMILIES, ANY: None}
    for family, attacks in families.items():
        out += ["", f"## {family}" + (f" ({', '.join(attacks)})" if attacks else ""), ""]
        for metric, label in METRICS.items():
            lines = at_ce_accuracy(points, ce, metric, attacks)
            lines += matched_pairs(points, "crl", metric, attacks)
            out += [f"- **{label}**: {lines[0]}"] + [f"  - {x}" for x in lines[1:]]
    return "\n".join(out) + "\n"


def summarize(sweep: Sweep) -> str:
    """OUT/summary.md, OUT/summary.png and OUT/answer.md from the finished settings; the
    table."""
    points = collect_points(sweep)
    if not points:
        raise CRLError(f"sweep {sweep.path}: no finished setting under {sweep.out}")
    table = summary_table(points)
    write_text_atomic(sweep.out / "summary.md",
                      f"# {sweep.path.name}\n\n{SUMMARY_NOTE}\n{table}")
    plot_fronts(sweep.out / "summary.png", points)
    if any(p.defense == "ce" for p in points):
        write_text_atomic(sweep.out / "answer.md", answer_text(points, sweep.path.name))
    return table


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="a sweep YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--print", action="store_true", dest="only_print",
                   help="write the recipes and print the crl commands; run nothing")
    p.add_argument("--tier", type=int, help="run this tier of the sweep's `tiers`")
    p.add_argument("--dataset", help="replace the recipes' dataset (e.g. imagefolder:PATH)")
    p.add_argument("--subset", type=int, help="use N samples in total (every audit)")
    p.add_argument("--out", help="run folder (default: the sweep's `out`)")
    p.add_argument("--resume", action="store_true",
                   help="continue interrupted audits (crl audit --resume)")
    p.add_argument("--summary-only", action="store_true",
                   help="only write summary.md, summary.png and answer.md from finished runs")
    return p.parse_args(argv)


def tier_of(sweep: Sweep, number: int | None) -> Tier | None:
    if number is None:
        if sweep.tiers:
            raise CRLError(f"sweep {sweep.path} has tiers {sorted(sweep.tiers)}: expected "
                           "--tier N")
        return None
    if number not in sweep.tiers:
        raise CRLError(f"--tier = {number}: expected one of the sweep's tiers "
                       f"{sorted(sweep.tiers) or '(none)'}")
    return sweep.tiers[number]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        sweep = with_options(load_sweep(args.sweep), dataset=args.dataset, subset=args.subset,
                             out=args.out)
        if args.summary_only:
            print(summarize(sweep))
            return 0
        tier = tier_of(sweep, args.tier)
        if args.only_print:
            print_commands(sweep, extra, tier)
            return 0
        rc = run(sweep, extra, tier=tier, resume=args.resume)
        if rc == 0:
            print(summarize(sweep))
            print(f"wrote {sweep.out}/summary.md, summary.png and answer.md")
        return rc
    except CRLError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
