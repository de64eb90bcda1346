"""Run a privacy-utility sweep (experiments/sweeps/*.yaml): one `crl audit` per defense setting.

    python benchmarks/sweep.py experiments/sweeps/fig4_cifar10_resnet18.yaml
    python benchmarks/sweep.py SWEEP --print                  # the crl commands only
    python benchmarks/sweep.py SWEEP -- --epochs 1 --subset 400  # extra flags for every audit

A sweep YAML names a Table 1 recipe (`base`, relative to the sweep file), AuditConfig fields
replacing the base's (`config`), a run folder (`out`) and, per defense, a list of parameter
settings (`variants`). Each setting becomes a recipe OUT/recipes/<defense>-<i>.yaml (the base
with `defenses: [<defense>]`, the setting merged over the base's `set` for that defense and
`out: OUT/<defense>-<i>`) and runs as `crl audit --config OUT/recipes/<defense>-<i>.yaml`
(in this process, through crl.cli.main). A rerun skips settings whose run folder holds
results of the same resolved config.
Then OUT/summary.md (seed means: train/test accuracy, each attack's AUC, the strongest) and
OUT/summary.png (test accuracy against the strongest AUC, one line per defense, as the paper's
Figs. 4, 5 and 7).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crl.config import FIELDS, load_yaml_recipe
from crl.errors import CRLError
from crl.utils import atomic_path, write_text_atomic
from crl.verdict import strongest

KEYS = ("base", "config", "out", "variants")


@dataclass(frozen=True)
class Variant:
    """One defense setting of a sweep: its name (`<defense>-<i>`), defense and parameters."""

    name: str
    defense: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """A checked sweep file: its base recipe, the fields replacing the base's, the run folder
    and the settings."""

    path: Path
    base: Path
    config: dict[str, Any]
    out: Path
    variants: tuple[Variant, ...]

    def recipe(self, variant: Variant) -> dict[str, Any]:
        """The AuditConfig values of one setting: base, then `config`, then the setting."""
        values = {**load_yaml_recipe(self.base), **self.config}
        base_set = _mapping(values.get("set") or {}, f"{self.base}: set")
        owners = {k: v for k, v in base_set.items() if k in (values.get("attacks") or [])}
        owners[variant.defense] = {**base_set.get(variant.defense, {}), **variant.params}
        values.update(defenses=[variant.defense], set=owners, out=str(self.out / variant.name))
        return values

    def recipe_path(self, variant: Variant) -> Path:
        return self.out / "recipes" / f"{variant.name}.yaml"


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
                       "optionally config, out")
    base = path.parent / str(data["base"])
    if not base.is_file():
        raise CRLError(f"sweep {path}: base = {data['base']!r}: expected a recipe file "
                       "relative to the sweep file")
    config = dict(_mapping(data.get("config") or {}, "config"))
    bad = sorted(set(config) - FIELDS)
    if bad:
        raise CRLError(f"sweep {path}: config.{bad[0]} = {config[bad[0]]!r}: expected an "
                       f"AuditConfig field ({', '.join(sorted(FIELDS))})")
    return Sweep(path, base, config,
                 Path(str(data.get("out") or f"runs/{path.stem}")),
                 _variants(data["variants"], "variants"))


def write_recipes(sweep: Sweep) -> list[Path]:
    """Each setting's recipe as YAML under OUT/recipes/ (atomic); their paths."""
    paths = []
    for v in sweep.variants:
        p = sweep.recipe_path(v)
        write_text_atomic(p, yaml.safe_dump(sweep.recipe(v), sort_keys=False))
        paths.append(p)
    return paths


def command(recipe: Path, extra: list[str]) -> list[str]:
    return ["audit", "--config", str(recipe), *extra]


def done(recipe: Path, extra: list[str]) -> bool:
    """Whether the run folder of `recipe` holds results of exactly this resolved config."""
    from crl.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(command(recipe, extra))).resolved()
    folder = Path(cfg.out)
    if not (folder / "results.json").is_file() or not (folder / "config.yaml").is_file():
        return False
    want = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return yaml.safe_load((folder / "config.yaml").read_text()) == want


def run(sweep: Sweep, extra: list[str], *, echo=print) -> int:
    """Every setting not yet done, through crl.cli.main; the first non-zero exit status stops."""
    from crl.cli import main as crl_main

    for v, recipe in zip(sweep.variants, write_recipes(sweep)):
        if done(recipe, extra):
            echo(f"[{v.name}] done already: {sweep.out / v.name}/results.json")
            continue
        echo("crl " + shlex.join(command(recipe, extra)))
        rc = crl_main(command(recipe, extra))
        if rc != 0:
            echo(f"sweep stopped at {v.name}: crl exited with status {rc}")
            return rc
    return 0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """Seed means per finished setting: accuracies, each attack's AUC and the strongest."""
    rows = []
    for v in sweep.variants:
        path = sweep.out / v.name / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        attacks = sorted({a for r in results for a in r["attacks"]})
        aucs = {a: _mean([r["attacks"][a]["auc"] for r in results]) for a in attacks}
        rows.append({"variant": v.name, "defense": v.defense, "params": v.params,
                     "train_acc": _mean([r["train_acc"] for r in results]),
                     "test_acc": _mean([r["test_acc"] for r in results]),
                     "auc": aucs, "strongest": aucs[strongest(aucs)], "seeds": len(results)})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    attacks = sorted({a for r in rows for a in r["auc"]})
    head = ["setting", "defense", "params", "seeds", "train %", "test %", *attacks, "strongest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = ", ".join(f"{k} {v}" for k, v in r["params"].items()) or "-"
        cells = [r["variant"], r["defense"], params, str(r["seeds"]),
                 f"{100 * r['train_acc']:.1f}", f"{100 * r['test_acc']:.1f}",
                 *(f"{r['auc'][a]:.3f}" if a in r["auc"] else "-" for a in attacks),
                 f"{r['strongest']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_front(path: Path, rows: list[dict[str, Any]]) -> None:
    """Test accuracy against the strongest attack's AUC, one line per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for defense in dict.fromkeys(r["defense"] for r in rows):
        pts = sorted((r["strongest"], 100 * r["test_acc"]) for r in rows
                     if r["defense"] == defense)
        ax.plot(*zip(*pts), marker="*" if defense == "ce" else "o", label=defense)
    ax.set_xlabel("strongest attack AUC (lower is more private)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def summarize(sweep: Sweep) -> str:
    """OUT/summary.md and OUT/summary.png from the finished settings; the table."""
    rows = summary_rows(sweep)
    if not rows:
        raise CRLError(f"sweep {sweep.path}: no finished setting under {sweep.out}")
    table = summary_table(rows)
    write_text_atomic(sweep.out / "summary.md", f"# {sweep.path.name}\n\n{table}")
    plot_front(sweep.out / "summary.png", rows)
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", help="a sweep YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--print", action="store_true", dest="only_print",
                   help="write the recipes and print the crl commands; run nothing")
    args = p.parse_args(ours)
    try:
        sweep = load_sweep(args.sweep)
        if args.only_print:
            for recipe in write_recipes(sweep):
                print("crl " + shlex.join(command(recipe, extra)))
            return 0
        rc = run(sweep, extra)
        if rc == 0:
            print(summarize(sweep))
            print(f"wrote {sweep.out}/summary.md and summary.png")
        return rc
    except CRLError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
