"""parser.dataclass behaves as the standard library's dataclass: the same repr, the same equality, unhashable,
still a dataclass; each case is one class declared with both, compared."""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from parser import dataclass as ours

REPO = Path(__file__).resolve().parent.parent


def declare(decorator: Callable, kw_only: bool) -> dict[str, type]:
    """The same classes, declared with ``decorator``."""
    wrap = decorator(kw_only=True) if kw_only else decorator

    @wrap
    class Empty:
        pass

    @wrap
    class One:
        name: str

    @wrap
    class Many:
        name: str
        size: int = 0
        tags: tuple[str, ...] = ()
        hidden: str = dataclasses.field(default="secret", repr=False)
        ignored: float = dataclasses.field(default=0.0, compare=False)
        items: list = dataclasses.field(default_factory=list)

    @wrap
    class Child(Many):
        extra: str = "x"

    @wrap
    class Own:
        value: int

        def __repr__(self) -> str:
            return "own"

        def __eq__(self, other: object) -> bool:
            return True

    return {"Empty": Empty, "One": One, "Many": Many, "Child": Child, "Own": Own}


INSTANCES: list[tuple[str, dict, dict]] = [  # class, fields of a, fields of b
    ("Empty", {}, {}),
    ("One", {"name": "a"}, {"name": "a"}),
    ("One", {"name": "a"}, {"name": "b"}),
    ("Many", {"name": "a", "size": 1, "tags": ("t",)}, {"name": "a", "size": 1, "tags": ("t",)}),
    ("Many", {"name": "a", "size": 1}, {"name": "a", "size": 2}),
    ("Many", {"name": "a", "hidden": "x"}, {"name": "a", "hidden": "y"}),  # hidden still compares
    ("Many", {"name": "a", "ignored": 1.0}, {"name": "a", "ignored": 2.0}),  # ignored does not
    ("Many", {"name": "a", "items": [1, 2]}, {"name": "a", "items": [1, 2]}),
    ("Many", {"name": "a", "size": float("nan")}, {"name": "a", "size": float("nan")}),  # nan != nan
    ("Child", {"name": "a", "extra": "y"}, {"name": "a", "extra": "y"}),
    ("Child", {"name": "a", "extra": "y"}, {"name": "a", "extra": "z"}),
    ("Own", {"value": 1}, {"value": 2}),
]


@pytest.mark.parametrize("kw_only", [False, True])
@pytest.mark.parametrize(("name", "a", "b"), INSTANCES)
def test_same_repr_and_equality_as_the_standard_dataclass(name: str, a: dict, b: dict, kw_only: bool) -> None:
    standard, project = declare(dataclasses.dataclass, kw_only)[name], declare(ours.dataclass, kw_only)[name]
    std_a, std_b = standard(**a), standard(**b)
    our_a, our_b = project(**a), project(**b)
    assert repr(our_a) == repr(std_a) and repr(our_b) == repr(std_b)
    assert (our_a == our_b) == (std_a == std_b)
    assert (our_a != our_b) == (std_a != std_b)
    if name != "Own":  # its own __eq__ says True to anything
        assert (our_a == std_a) is False  # another class is never equal, as with the standard one
        assert our_a.__eq__(object()) is NotImplemented
    assert standard.__hash__ is project.__hash__  # None, unhashable, for both
    assert [f.name for f in dataclasses.fields(project)] == [f.name for f in dataclasses.fields(standard)]
    assert repr(dataclasses.replace(our_a)) == repr(our_a)
    assert dataclasses.asdict(our_a) == dataclasses.asdict(std_a)
    assert getattr(project, "__match_args__", ()) == getattr(standard, "__match_args__", ())


@ours.dataclass
class Pickled:
    name: str
    items: list = dataclasses.field(default_factory=list)


def test_a_dataclass_pickles_and_its_repr_survives_a_cycle() -> None:
    value = Pickled("a", items=[1])
    assert pickle.loads(pickle.dumps(value)) == value
    value.items.append(value)
    assert repr(value) == "Pickled(name='a', items=[1, ...])"
    with pytest.raises(TypeError, match="unhashable"):
        hash(value)


def test_the_project_declares_its_dataclasses_with_it() -> None:
    """The standard decorator compiles two methods more per class at every start: none of the project's
    modules uses it directly."""
    direct = [str(path.relative_to(REPO)) for package in ("builder", "cache", "parser")
              for path in sorted((REPO / package).rglob("*.py"))
              if path.name != "dataclass.py"
              and re.search(r"^from dataclasses import .*\bdataclass\b|^import dataclasses$|@dataclasses\.dataclass",
                            path.read_text(), re.M)]
    assert direct == []
