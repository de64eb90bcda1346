"""Name -> factory registries for datasets, models, defenses and attacks (timm-style)."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from crl.errors import CRLError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories; unknown names raise a CRLError listing the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise RuntimeError(f"{self.kind} '{name}' registered twice")
            if isinstance(obj, type):
                obj.name = name   # the registry is the one place a component's name is written
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise CRLError(
                f"unknown {self.kind} '{name}'; expected one of: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


DATASETS: Registry = Registry("dataset")
MODELS: Registry = Registry("model")
DEFENSES: Registry = Registry("defense")
ATTACKS: Registry = Registry("attack")
