"""A tiny registry in the style of lm-evaluation-harness: a decorator registers under a name.

Every entry remembers where it came from (``origin``): ``builtin`` for eebench's own modules,
``include <file>`` for a file loaded with ``--include``, ``entry point <name> (<dist>)`` for an
installed plugin, else the module that registered it; ``eebench list`` shows it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from eebench.errors import UnknownNameError

T = TypeVar("T")

#: Set while a plugin is being imported (``eebench.plugins``): the origin of what it registers.
_ORIGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("eebench_origin", default=None)


@contextmanager
def registering_from(origin: str):
    """Everything registered inside this block records ``origin``."""
    token = _ORIGIN.set(origin)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def _origin_of(obj: object) -> str:
    given = _ORIGIN.get()
    if given is not None:
        return given
    module = getattr(getattr(obj, "cls", obj), "__module__", None) or "?"
    return "builtin" if module == "eebench" or module.startswith("eebench.") else f"module {module}"


class Registry(Generic[T]):
    """Maps names to objects; an unknown name raises an error that lists the known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        def deco(o: T) -> T:
            if name in self._items and self._items[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._origins[name]} and {_origin_of(o)})")
            self._items[name] = o
            self._origins[name] = _origin_of(o)
            return o

        return deco if obj is None else deco(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def origin(self, name: str) -> str:
        """Where ``name`` was registered from."""
        return self._origins.get(name, "?")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
