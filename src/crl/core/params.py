"""Parameter specs: every configurable component (defense, attack) declares its parameters once.

A `Param` holds the type, valid range, default, help text and the search range used by tuning;
`ParamSpec.resolve` turns user values into checked ones, with one error format for every check:

    crl.alpha_rce = -1: expected a number >= 0
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from crl.core.errors import CRLError

#: bootstrap resamples behind every 95% interval: `--bootstrap`'s default and crl.attacks.metrics'
DEFAULT_BOOTSTRAP = 200


@dataclass(frozen=True)
class Param:
    """One parameter. `kind` is float, int, bool or str; numbers may be bounded (open or closed
    ends); `choices` restricts str values; `nullable` admits None. `search` = (low, high, scale)
    with scale 'linear' or 'log' is the range `crl tune` searches (None: not tuned)."""

    name: str
    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    help: str = ""
    search: tuple[float, float, str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in (float, int, bool, str):
            raise TypeError(f"Param {self.name}: kind must be float, int, bool or str")
        if self.search is not None and self.search[2] not in ("linear", "log"):
            raise TypeError(f"Param {self.name}: search scale must be 'linear' or 'log'")

    def expected(self) -> str:
        """What a valid value looks like, in words (used in every error message)."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind is str:
            text = "one of: " + ", ".join(self.choices) if self.choices else "a string"
        else:
            noun = "an integer" if self.kind is int else "a number"
            text = noun + _range_words(self.low, self.high, self.low_open, self.high_open)
        return text + (" or null" if self.nullable else "")

    def check(self, owner: str, value: Any) -> Any:
        """`value` converted to this parameter's type, else a one-line CRLError."""
        if value is None and self.nullable:
            return None
        if self._valid(value):
            return self.kind(value)
        raise CRLError(f"{owner}.{self.name} = {value!r}: expected {self.expected()}")

    def _valid(self, v: Any) -> bool:
        if self.kind is bool:
            return isinstance(v, (bool, np.bool_))
        if self.kind is str:
            return isinstance(v, str) and (self.choices is None or v in self.choices)
        if isinstance(v, (bool, np.bool_)):
            return False
        if self.kind is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, (int, np.integer)):
                return False
        elif not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        too_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        return not too_high

    def describe(self) -> str:
        """One line for `crl list`: name, default, valid values, search range, help."""
        parts = [f"{self.name} = {self.default!r}", f"({self.expected()})"]
        if self.search is not None:
            lo, hi, scale = self.search
            parts.append(f"[tune {lo}..{hi} {scale}]")
        if self.help:
            parts.append(f"- {self.help}")
        return " ".join(parts)


def _range_words(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


class ParamSpec:
    """The ordered parameters of one component."""

    def __init__(self, *params: Param) -> None:
        self.params: dict[str, Param] = {}
        for p in params:
            if p.name in self.params:
                raise TypeError(f"parameter {p.name} declared twice")
            self.params[p.name] = p

    def __iter__(self):
        return iter(self.params.values())

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    def names(self) -> list[str]:
        return list(self.params)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self}

    def without(self, names: Iterable[str]) -> ParamSpec:
        """The spec minus `names` (e.g. parameters an ablation fixes)."""
        drop = set(names)
        return ParamSpec(*(p for p in self if p.name not in drop))

    def resolve(self, owner: str, given: Any = None) -> dict[str, Any]:
        """Defaults overridden by `given` (a mapping), every value checked."""
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise CRLError(f"{owner} = {given!r}: expected a mapping of parameter names to values")
        for key in given:
            if key not in self.params:
                valid = ", ".join(self.params) or "none"
                raise CRLError(f"{owner}.{key}: unknown parameter; expected one of: {valid}")
        return {p.name: p.check(owner, given.get(p.name, p.default)) for p in self}


def check_value(owner: str, name: str, value: Any, **spec: Any) -> Any:
    """Check one value outside a component (e.g. a config field) with the same rules/format."""
    return Param(name, None, **spec).check(owner, value)
