"""The `crl` command line: `crl audit` (train, attack, report), `crl tune`, `crl train` (one
model for deployment), `crl report` (rebuild a run's report) and `crl list`.

The audit flags are built from the AuditConfig field declarations (crl.config): a new field with
a `help` gets its flag here. Flag values are converted leniently (a value that does not parse
is passed on as typed) so that every bad value, from a flag or a YAML recipe, fails the same way:
one CRLError line from the field's check.

Building the parser, `--help`, `--version` and argument errors (names included, from
crl.core.catalog) never import torch: each command imports what it needs when it runs
(tests/cli/test_cli_fast.py).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from crl import __version__
from crl.core.catalog import canonical, check_names, list_text
from crl.core.errors import CRLError


def _scalar(kind: type) -> Callable[[str], Any]:
    """str -> kind where it parses; otherwise the number it reads as or the text itself, for
    the field check to reject with the value in its message."""
    def convert(text: str) -> Any:
        for parse in (int, float) if kind in (int, float) else (kind,):
            try:
                return parse(text)
            except ValueError:
                continue
        return text

    return convert


def _items(kind: type) -> Callable[[str], list[Any]]:
    """'a,b,c' -> a list of converted items."""
    one = _scalar(kind)

    def convert(text: str) -> list[Any]:
        return [one(t.strip()) for t in text.split(",") if t.strip()]

    return convert


def _add_field(group: argparse.ArgumentParser, spec: Any) -> None:
    if spec.kind is bool:
        action = "store_false" if spec.default is True else "store_true"
        group.add_argument(spec.flags, dest=spec.name, action=action, default=None, help=spec.help)
    else:
        convert = _items(spec.kind) if spec.many else _scalar(spec.kind)
        metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else None
        group.add_argument(spec.flags, dest=spec.name, type=convert, metavar=metavar,
                           help=spec.help or None)


def build_parser() -> argparse.ArgumentParser:
    from crl.config import cli_fields

    p = argparse.ArgumentParser(prog="crl", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="`crl COMMAND --help` shows a command's options and the "
                                       "per-dataset default recipe.")
    p.add_argument("--version", action="version", version=f"crl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="train target/shadow/reference models, attack, report",
                       description="Train models per defense, run every attack, write a report. "
                                   "With no flags: digits / mlp, 3 seeds, a few minutes on CPU.",
                       epilog=recipe_epilog())
    a.add_argument("--config", help="YAML recipe whose keys mirror these flags")
    for spec in cli_fields():
        _add_field(a, spec)
    a.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE",
                   help="defense/attack hyper-parameter, e.g. crl.alpha_rce=0.5 (repeatable)")

    listing = sub.add_parser("list", help="list the registered datasets, models, defenses and "
                                          "attacks, each with a one-line description and "
                                          "citation, and every defense's and attack's parameters")
    listing.add_argument("--write-catalog", action="store_true",
                         help="developers: regenerate src/crl/core/catalog.txt (what `crl list` "
                              "prints) from the live registries (imports torch)")
    _add_tune_parser(sub)
    _add_train_parser(sub)
    _add_report_parser(sub)
    return p


def recipe_epilog(audit: bool = True) -> str:
    """The per-dataset default recipe (crl.config.DATASET_DEFAULTS), in words, for --help;
    audit=False: the training part only (crl train has no subset and no reference models)."""
    from crl.config import DATASET_DEFAULTS

    def words(d: dict[str, Any]) -> str:
        text = f"{d['model']}, {d['epochs']} epochs, batch {d['batch_size']}, lr {d['lr']}"
        if d.get("milestones"):
            text += f" (x0.1 at epochs {','.join(map(str, d['milestones']))})"
        if not audit:
            return text
        subset = f"subset {d['subset']}" if d.get("subset") else "no subset"
        return f"{text}, {subset}, {d['references']} reference models"

    named = "; ".join(f"{name}: {words(d)}" for name, d in DATASET_DEFAULTS.items()
                      if name != "*")
    return (f"Default recipe per dataset, for every option left unset: {named}; any other "
            f"dataset: {words(DATASET_DEFAULTS['*'])}. `crl list` describes every dataset, "
            "model, defense and attack.")


def config_from_args(args: argparse.Namespace) -> Any:
    """The AuditConfig of a YAML recipe (--config) overridden by the flags given (unchecked:
    `.resolved()` checks it)."""
    from crl.config import AuditConfig, check_set, load_yaml_recipe, parse_set

    values: dict[str, Any] = load_yaml_recipe(args.config) if args.config else {}
    if "set" in values:
        values["set"] = check_set(values["set"])
    for key, v in vars(args).items():
        if key in ("command", "config", "set") or v is None:
            continue
        values[key] = v
    for owner, params in parse_set(args.set).items():
        values.setdefault("set", {}).setdefault(owner, {}).update(params)
    return AuditConfig(**canonical_names(values))


def canonical_names(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every dataset, model, defense and attack name (and `set` owner) spelled as
    registered where it matches one registered name up to capitalisation (`CRL` -> `crl`);
    other values are left for the field checks to judge."""
    keys = {"dataset": "dataset", "model": "model", "defense": "defense",
            "defenses": "defense", "compare": "defense", "attacks": "attack",
            "confirm_attacks": "attack"}
    out = dict(values)
    for key, kind in keys.items():
        value = out.get(key)
        if isinstance(value, str):
            out[key] = canonical(kind, value)
        elif isinstance(value, list):
            out[key] = [canonical(kind, v) for v in value]
    if isinstance(out.get("set"), dict):
        def owner(name: Any) -> Any:
            by_defense = canonical("defense", name)
            return by_defense if by_defense != name else canonical("attack", name)
        out["set"] = {owner(k): v for k, v in out["set"].items()}
    return out


def list_lines(registries: list[Any] | None = None) -> list[str]:
    """`crl list`: every dataset, model, defense and attack with its one-line description
    (and citation); defenses and attacks with their parameters (default, valid values, search
    range) and, for defenses, the engine they can train with; models with what the ensemble
    engine does with them."""
    if registries is None:
        registries = _registries()
    lines = []
    for reg in registries:
        if reg.kind in ("defense", "attack"):
            lines.append(f"{reg.kind}s:")
            for name in reg.names():
                lines.extend(_component_lines(name, reg.get(name), reg.kind,
                                              reg.description(name)))
        else:
            extra = ", imagefolder:PATH" if reg.kind == "dataset" else ""
            lines.append(f"{reg.kind}s: {', '.join(reg.names())}{extra}")
            heads = (_model_heads(reg) if reg.kind == "model"
                     else {name: f"  {name}" for name in reg.names()})
            for name, head in heads.items():
                lines.extend(_described(head, reg.description(name)))
            if reg.kind == "dataset":
                lines.extend(_described(f"  {IMAGEFOLDER}", IMAGEFOLDER_WORDS))
    return lines


IMAGEFOLDER = "imagefolder:PATH"
IMAGEFOLDER_WORDS = ("your own images: PATH/train/<class>/ and PATH/test/<class>/, or train/ "
                     "alone (crl train: --test-fraction)")


def write_catalog() -> None:
    """Regenerate catalog.txt (crl.core.catalog.LIST_FILE) from the live registries."""
    from crl.core import catalog
    from crl.core.utils import write_text_atomic

    write_text_atomic(catalog.LIST_FILE, "\n".join(list_lines()) + "\n")
    print(f"wrote {catalog.LIST_FILE}")


def _described(head: str, description: str) -> list[str]:
    """The head line, then the description indented under it (when there is one)."""
    return [head, f"    {description}"] if description else [head]


def _model_heads(models: Any) -> dict[str, str]:
    """Per model, its name and what `--engine ensemble` does with it
    (crl.engine.stacked.ensemble_note)."""
    import torch

    from crl.engine.stacked import ensemble_note

    heads = {}
    for name in models.names():
        with torch.device("meta"):
            model = models.get(name)(3, 32, 10)
        heads[name] = f"  {name} (ensemble engine: {ensemble_note(model)})"
    return heads


def _component_lines(name: str, cls: Any, kind: str, description: str = "") -> list[str]:
    spec = getattr(cls, "spec", None)
    params = list(spec) if spec is not None else []
    notes = []
    if kind == "defense":
        notes.append("engine: " + ("ensemble" if getattr(cls, "batchable", True) else "sequential"))
    if spec is not None and not params:
        notes.append("no parameters")
    head = f"  {name}" + (f" ({'; '.join(notes)})" if notes else "")
    return [*_described(head, description), *(f"      {p.describe()}" for p in params)]


def _registries() -> list[Any]:
    import crl.attacks  # (registration)
    import crl.data.datasets
    import crl.defenses
    import crl.models  # noqa: F401
    from crl.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    return [DATASETS, MODELS, DEFENSES, ATTACKS]


def _check_names(model: str, defenses: list[str], attacks: list[str]) -> None:
    """Unknown names fail here, from crl.core.catalog, before the command imports torch (with the
    registry's words; the command checks them again against the registries)."""
    check_names("model", [model])
    check_names("defense", defenses)
    check_names("attack", attacks)


def _audit(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    resolved = cfg.resolved()
    _check_names(resolved.model, resolved.defenses, resolved.attacks)
    from crl.commands.audit import audit

    audit(cfg)


#: audit flags `crl tune` does not take: it chooses the defenses and always continues its study
_TUNE_SKIPS = ("defenses", "resume")


def _add_tune_parser(sub: Any) -> None:
    """`crl tune`: its own options (crl.tune.options) plus the audit's recipe flags."""
    from dataclasses import replace

    from crl.config import cli_fields
    from crl.tune.options import OUT, TUNE_SPECS

    t = sub.add_parser("tune", help="search a defense's parameters for the privacy-utility "
                                    "front (Optuna)",
                       description="Search a defense's parameter ranges (its spec) for the "
                                   "front of test accuracy vs the strongest attack; recommend "
                                   "a setting and re-run it on fresh seeds.",
                       epilog=recipe_epilog())
    t.add_argument("--config", help="YAML recipe whose keys mirror the audit flags")
    for spec in TUNE_SPECS.values():
        _add_field(t, spec)
    for spec in cli_fields():
        if spec.name not in _TUNE_SKIPS:
            _add_field(t, replace(spec, help=f"run directory (default {OUT})")
                       if spec.name == "out" else spec)
    t.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE",
                   help="defense/attack hyper-parameter; a tuned defense's parameter set here "
                        "is fixed, not searched (repeatable)")


def _tune(args: argparse.Namespace, argv: list[str]) -> None:
    import shlex

    from crl.config import load_yaml_recipe
    from crl.tune.options import OUT, TUNE_SPECS, TuneOptions

    given = vars(args)
    opts = TuneOptions(**canonical_names(
        {k: v for k, v in given.items() if k in TUNE_SPECS and v is not None}))
    audit_args = argparse.Namespace(**{k: v for k, v in given.items() if k not in TUNE_SPECS})
    if args.out is None and "out" not in (load_yaml_recipe(args.config) if args.config else {}):
        audit_args.out = OUT
    cfg = config_from_args(audit_args)
    checked, resolved = opts.checked(), cfg.resolved()
    _check_names(resolved.model, [checked.defense, *checked.compare],
                 [*resolved.attacks, *(checked.confirm_attacks or [])])
    from crl.tune.run import run_tune

    run_tune(cfg, opts, command=shlex.join(["crl", *argv]))


def _add_train_parser(sub: Any) -> None:
    """`crl train`: crl.train_options.TrainConfig's options (the shared recipe and machine
    flags, one --defense)."""
    from crl.config import cli_fields
    from crl.train_options import TrainConfig

    t = sub.add_parser("train", help="train one model on the dataset's own train split, for "
                                     "deployment",
                       description="Train one model on the dataset's own train split (digits: a "
                                   "fixed stratified 80/20 split), evaluate it on the test split, "
                                   "write model.pt (crl.load_model) and its metrics to --out.",
                       epilog=recipe_epilog(audit=False))
    for spec in cli_fields(TrainConfig):
        _add_field(t, spec)
    t.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE",
                   help="defense hyper-parameter, e.g. crl.alpha_rce=0.5 (repeatable)")


def _add_report_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="rebuild report.md, report.html and figures of an audit "
                                      "run, without training",
                       description="Rebuild report.md, report.html, figures/ and vulnerability/ "
                                   "of a finished audit run from its config.yaml and scores/.")
    r.add_argument("run", metavar="RUN", help="the audit's run directory (its --out)")


def _train(args: argparse.Namespace) -> None:
    from crl.config import parse_set
    from crl.train_options import TrainConfig

    values = {k: v for k, v in vars(args).items() if k not in ("command", "set") and v is not None}
    cfg = TrainConfig(**canonical_names({**values, "set": parse_set(args.set)}))
    resolved = cfg.resolved()
    _check_names(resolved.model, [resolved.defense], [])
    from crl.commands.train import run_train

    run_train(cfg)


def _report(args: argparse.Namespace) -> None:
    from crl.audit.pipeline import echo_verdict
    from crl.report.rebuild import rebuild_report

    print(rebuild_report(args.run))
    print(f"wrote {args.run}/report.md, report.html, verdict.json and figures/")
    echo_verdict(args.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list" and args.write_catalog:
            write_catalog()
        elif args.command == "list":
            print(list_text())
        elif args.command == "audit":
            _audit(args)
        elif args.command == "tune":
            _tune(args, sys.argv[1:] if argv is None else argv)
        elif args.command == "train":
            _train(args)
        elif args.command == "report":
            _report(args)
    except CRLError as e:
        print(f"crl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crl: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
