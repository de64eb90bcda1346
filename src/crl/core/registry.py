"""Name -> factory registries for datasets, models, defenses and attacks (timm-style).

Each entry has a one-line description with its citation (`crl list` prints it): a class's
`description` ClassVar, or the `description` given to `register` (functions). Lookups accept
any capitalisation of a name when exactly one registered name matches it (`CRL`, `LiRA`); an
unknown name gets the closest registered names as a suggestion (difflib). crl.core.catalog lists the
registered names without importing the modules that register them (the CLI checks names there).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from crl.core.errors import CRLError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories; unknown names raise a CRLError listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Register under `name`; `description` (one line, with its citation) for entries that
        carry no `description` attribute of their own (functions)."""
        def decorator(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            if isinstance(obj, type):
                obj.name = name   # the registry is the one place a component's name is written
            self._items[name] = obj
            if description is not None:
                self._descriptions[name] = description
            return obj

        return decorator

    def canonical(self, name: str) -> str:
        """The registered name `name` means: itself, or the one registered name equal to it up
        to capitalisation; otherwise `name` unchanged."""
        return canonical_among(name, self._items)

    def get(self, name: str) -> T:
        key = self.canonical(name)
        if key not in self._items:
            raise unknown_name(self.kind, name, self._items)
        return self._items[key]

    def suggestion(self, name: str) -> str:
        """The words ` (did you mean 'crl'?)` for a name close to registered ones, else ''."""
        return suggestion_among(name, self._items)

    def description(self, name: str) -> str:
        """The entry's one-line description ('' if it has none)."""
        key = self.canonical(name)
        if key in self._descriptions:
            return self._descriptions[key]
        obj = self._items.get(key)
        own = vars(obj) if isinstance(obj, type) else {}   # a class's own, never inherited
        return str(own.get("description") or "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def canonical_among(name: str, names: Iterable[str]) -> str:
    """The name of `names` that `name` means: itself, or the one name equal to it up to
    capitalisation; otherwise `name` unchanged."""
    names = list(names)
    if name in names or not isinstance(name, str):
        return name
    matches = [n for n in names if n.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else name


def suggestion_among(name: str, names: Iterable[str]) -> str:
    """The words ` (did you mean 'crl'?)` for a name close to some of `names`, else ''."""
    if not isinstance(name, str):
        return ""
    lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(f"'{lower[c]}'" for c in close) + "?)"


def unknown_name(kind: str, name: str, names: Iterable[str]) -> CRLError:
    """The error for a `kind` name that is none of `names`: `unknown model 'nope'; expected one
    of: cnn, mlp`, with a did-you-mean for a close name."""
    return CRLError(f"unknown {kind} '{name}'{suggestion_among(name, names)}; expected one of: "
                    f"{', '.join(sorted(names))}")


DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
DEFENSES: Registry = Registry("defense")
ATTACKS: Registry = Registry("attack")
