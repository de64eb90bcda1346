"""Every registered dataset, model, defense and attack name, known without importing the modules
that register them (they import torch): the CLI spells and checks names from this table before
a command imports anything heavy, so `crl audit --model nope` answers at once.

The registries (crl.registry) stay the truth: tests/test_cli_fast.py holds this table equal to
them, so a newly registered component adds its name here as well.
"""
from __future__ import annotations

from typing import Any

from crl.registry import canonical_among, unknown_name

NAMES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "cifar100", "digits", "svhn"),
    "model": ("cnn", "densenet121", "googlenet", "mlp", "resnet18", "vgg11_bn"),
    "defense": ("advreg", "ce", "confidence_penalty", "crl", "dmp", "dpsgd", "early_stopping",
                "hamp", "imprelaxloss", "label_smoothing", "rcl", "relaxloss"),
    "attack": ("augment", "boundary", "boundary_whitebox", "confidence", "entropy", "gap",
               "gradx", "lira", "lira_offline", "loss", "mentr", "nn", "rmia"),
}


def canonical(kind: str, name: Any) -> Any:
    """The registered `kind` name that `name` means (crl.registry.Registry.canonical)."""
    return canonical_among(name, NAMES[kind])


def check_names(kind: str, names: list[Any]) -> None:
    """The registry's CRLError (with its did-you-mean) for the first of `names` that is no
    registered `kind` name up to capitalisation."""
    for name in names:
        if canonical(kind, name) not in NAMES[kind]:
            raise unknown_name(kind, name, NAMES[kind])
