"""What the registries hold, known without importing the modules that register them (they
import torch): the CLI spells and checks names from NAMES before a command imports anything
heavy, so `crl audit --model nope` answers at once, and `crl list` prints catalog.txt, the list
of every component with its description, parameters and engine notes.

The registries (crl.core.registry) stay the truth: tests/cli/test_cli_fast.py holds NAMES and
catalog.txt equal to them. A newly registered component adds its name to NAMES; any change of
a name, description, parameter or engine note regenerates catalog.txt with
`crl list --write-catalog` (crl.cli.write_catalog).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from crl.core.registry import canonical_among, unknown_name

#: `crl list`'s text, generated from the live registries by `crl list --write-catalog`
LIST_FILE = Path(__file__).with_name("catalog.txt")

NAMES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "cifar100", "digits", "svhn"),
    "model": ("cnn", "densenet121", "googlenet", "mlp", "resnet18", "vgg11_bn"),
    "defense": ("advreg", "ce", "confidence_penalty", "crl", "dmp", "dpsgd", "early_stopping",
                "hamp", "imprelaxloss", "label_smoothing", "rcl", "relaxloss"),
    "attack": ("augment", "boundary", "boundary_whitebox", "confidence", "entropy", "gap",
               "gradx", "lira", "lira_offline", "loss", "mentr", "nn", "rmia"),
}


def canonical(kind: str, name: Any) -> Any:
    """The registered `kind` name that `name` means (crl.core.registry.Registry.canonical)."""
    return canonical_among(name, NAMES[kind])


def check_names(kind: str, names: list[Any]) -> None:
    """The registry's CRLError (with its did-you-mean) for the first of `names` that is no
    registered `kind` name up to capitalisation."""
    for name in names:
        if canonical(kind, name) not in NAMES[kind]:
            raise unknown_name(kind, name, NAMES[kind])


def list_text() -> str:
    """`crl list`'s text (catalog.txt), read without importing torch."""
    return LIST_FILE.read_text(encoding="utf-8").rstrip("\n")
