"""``dataclass`` for the project: the standard library's, with a ``__repr__`` and an ``__eq__`` that cost no compiling.

For every class it decorates, Python 3.11's ``@dataclass`` writes the source of ``__init__``, ``__repr__`` and
``__eq__`` and compiles each one, when the module is imported. Across pybuild's data classes the last two
alone were about 12% of the instructions of a one-step cold build, paid again by every command. This
``dataclass`` lets the standard one make ``__init__`` and makes the other two from closures over the field
names instead: the same text and the same comparison as the standard one's, and the classes stay
dataclasses (``fields``, ``replace``, ``asdict``, pickling). Modules of builder/, cache/ and parser/ import
``dataclass`` from here.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def dataclass(cls: T | None = None, /, *, kw_only: bool = False) -> T | Callable[[T], T]:
    """``@dataclass`` or ``@dataclass(kw_only=True)``, as the module docstring says."""

    def make(cls: T) -> T:
        made = dataclasses.dataclass(cls, repr=False, eq=False, kw_only=kw_only)
        _add_value_methods(made)
        return made

    return make if cls is None else make(cls)


def _add_value_methods(cls: type) -> None:
    """``__repr__`` and ``__eq__`` as dataclass writes them, and unhashable as dataclass leaves an ``eq`` class;
    a method the class defines itself stays."""
    shown = tuple(field.name for field in dataclasses.fields(cls) if field.repr)
    compared = tuple(field.name for field in dataclasses.fields(cls) if field.compare)
    values: Callable[[Any], tuple] = (attrgetter(*compared) if len(compared) > 1
                                      else (lambda obj, get=attrgetter(*compared): (get(obj),)) if compared
                                      else (lambda obj: ()))

    @reprlib.recursive_repr()
    def __repr__(self: Any) -> str:
        return f"{self.__class__.__qualname__}({', '.join(f'{name}={getattr(self, name)!r}' for name in shown)})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    if "__repr__" not in cls.__dict__:
        __repr__.__qualname__ = f"{cls.__qualname__}.__repr__"
        cls.__repr__ = __repr__  # type: ignore[method-assign]
    if "__eq__" not in cls.__dict__:
        __eq__.__qualname__ = f"{cls.__qualname__}.__eq__"
        cls.__eq__ = __eq__  # type: ignore[method-assign]
    if "__hash__" not in cls.__dict__:
        cls.__hash__ = None  # type: ignore[assignment]
