"""The search space of a defense: every parameter of its spec with a search range
(`Param.search = (low, high, "linear"|"log")`) that --set does not fix; the rest keep their
defaults (or the --set value)."""
from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

import crl.defenses  # noqa: F401  (registers the defenses)
from crl.core.errors import CRLError
from crl.core.params import Param
from crl.core.registry import DEFENSES


def distribution(p: Param) -> BaseDistribution:
    """The Optuna distribution of a parameter's search range."""
    assert p.search is not None
    low, high, scale = p.search
    if p.kind is int:
        return IntDistribution(int(low), int(high), log=scale == "log")
    return FloatDistribution(float(low), float(high), log=scale == "log")


def search_space(defense: str, fixed: dict[str, Any]) -> dict[str, BaseDistribution]:
    """{name: distribution} of the defense's searched parameters minus those in `fixed`."""
    spec = DEFENSES.get(defense).spec
    space = {p.name: distribution(p) for p in spec if p.search is not None and p.name not in fixed}
    if not space:
        reason = "--set fixes every one" if any(p.search for p in spec) else "its spec has none"
        tunable = [n for n in DEFENSES.names() if any(p.search for p in DEFENSES.get(n).spec)]
        raise CRLError(f"defense = {defense!r}: no parameter with a search range to tune "
                       f"({reason}); expected one of: {', '.join(tunable)}")
    return space
