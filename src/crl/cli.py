"""The `crl` command line: `crl audit` (train, attack, report) and `crl list`."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from crl.errors import CRLError


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")


def _names(text: str) -> list[str]:
    from crl.config import split_names

    return split_names(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crl", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audit", help="train target/shadow/reference models, attack, report",
                       description="Train models per defense, run every attack, write a report. "
                                   "With no flags: digits / mlp, 3 seeds, a few minutes on CPU.")
    a.add_argument("--config", help="YAML recipe whose keys mirror these flags")
    a.add_argument("--dataset", help="digits (default) | cifar10 | cifar100 | svhn | imagefolder:PATH")
    a.add_argument("--model", help="mlp | cnn | resnet18 | vgg11_bn | densenet121 | googlenet")
    a.add_argument("--defenses", type=_names, help="comma-separated defense names (default: ce,crl)")
    a.add_argument("--attacks", type=_names, help="comma-separated attack names (default: all)")
    a.add_argument("--epochs", type=int)
    a.add_argument("--batch-size", type=int)
    a.add_argument("--lr", type=float)
    a.add_argument("--milestones", type=_int_list, help="epochs at which the lr is multiplied by 0.1")
    a.add_argument("--augment", action="store_true", default=None, help="random crop + flip")
    a.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    a.add_argument("--channels-last", action="store_true", default=None,
                   help="channels_last memory format (faster convolutions on CPU)")
    a.add_argument("--subset", type=int, help="use N samples in total (stratified)")
    a.add_argument("--seeds", type=_int_list, help="comma-separated seeds (default 0,1,2)")
    a.add_argument("--shadows", type=int, help="shadow models per target (default 5)")
    a.add_argument("--references", type=int, help="LiRA/RMIA reference models (default 16)")
    a.add_argument("--shadow-defense", choices=["same", "none"],
                   help="train shadows with the target's defense (same, default) or none")
    a.add_argument("--out", help="run directory (default runs/audit)")
    a.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    a.add_argument("--data-root", help="folder holding torchvision dataset files")
    a.add_argument("--download", action="store_true", default=None,
                   help="allow torchvision to download the dataset")
    a.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run in --out")
    a.add_argument("--no-cache", dest="cache", action="store_false", default=None,
                   help="do not reuse or store trained models in the model cache")
    a.add_argument("--quiet", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    a.add_argument("--set", action="append", default=[], metavar="NAME.PARAM=VALUE",
                   help="defense/attack hyper-parameter, e.g. crl.alpha_rce=0.5 (repeatable)")

    sub.add_parser("list", help="list the registered datasets, models, defenses and attacks")
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    from crl.config import AuditConfig, load_yaml_recipe, parse_set

    values: dict[str, Any] = load_yaml_recipe(args.config) if args.config else {}
    if "set" in values:
        if not isinstance(values["set"], dict):
            raise CRLError("--config: 'set' must map NAME to {PARAM: VALUE}")
        values["set"] = {k: dict(v) for k, v in values["set"].items()}
    for key, v in vars(args).items():
        if key in ("command", "config", "set") or v is None:
            continue
        values[key] = v
    for owner, params in parse_set(args.set).items():
        values.setdefault("set", {}).setdefault(owner, {}).update(params)
    return AuditConfig(**values)


def _list() -> None:
    import crl.attacks  # noqa: F401
    import crl.defenses  # noqa: F401
    import crl.models  # noqa: F401
    from crl.registry import ATTACKS, DATASETS, DEFENSES, MODELS

    import crl.data.datasets  # noqa: F401

    for reg in (DATASETS, MODELS, DEFENSES, ATTACKS):
        extra = ", imagefolder:PATH" if reg is DATASETS else ""
        print(f"{reg.kind}s: {', '.join(reg.names())}{extra}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            _list()
        elif args.command == "audit":
            from crl.audit import run_audit

            run_audit(config_from_args(args))
    except CRLError as e:
        print(f"crl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crl: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
