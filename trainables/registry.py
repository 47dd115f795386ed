"""Registries by name, filled where things are defined (the peft / timm pattern).

One registry per kind (backbones, pre-training methods, fine-tuning strategies, search spaces).
A decorator at the definition registers it; duplicate or malformed names are refused, and an
unknown name raises :class:`StudyInputError` listing the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from trainables.errors import StudyInputError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A name -> object table for one kind of thing."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        self.kind = kind
        self.plural = plural or (kind[:-1] + "ies" if kind.endswith("y") else kind + "s")
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lower_snake_case")

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``; a clear error listing the valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise StudyInputError(
                f"unknown {self.kind} {name!r}; valid {self.plural}: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
