"""`crl train`'s config (crl.commands.train runs it): the shared recipe and machine fields of every
command (crl.config.RecipeConfig, MachineConfig) plus one --defense, --seed, --test-fraction
and --out. Kept free of torch so that `crl train --help` and its argument errors answer at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from crl.config import MachineConfig, RecipeConfig, option


@dataclass
class TrainRecipe(RecipeConfig):
    """What `crl train` trains, beyond the shared recipe (declared apart from TrainConfig so
    that the fields keep their order: recipe, train, machine)."""

    HELP_FIRST: ClassVar[tuple[str, ...]] = ("dataset", "model", "defense")

    defense: str = option("crl", kind=str, pattern=r"[^,\s]+", words="one defense name",
                          help="the defense to train with (default crl; `crl list` shows all)")
    seed: int = option(0, kind=int, low=0, help="the model's seed (default 0)")
    test_fraction: float | None = option(
        None, kind=float, low=0.0, high=1.0, low_open=True, high_open=True, nullable=True,
        help="for data without a test split of its own (digits, imagefolder with train/ "
             "alone): the share held out for testing, stratified, from a fixed stream "
             "(default 0.2)")
    out: str = option("runs/train", kind=str, pattern=r"(?s).+", words="a non-empty path",
                      help="output directory (default runs/train)")

    def components(self) -> list[str]:
        return [self.defense]


@dataclass
class TrainConfig(MachineConfig, TrainRecipe):
    """`crl train`'s options: the shared recipe, one --defense, --seed, --out, the machine."""

