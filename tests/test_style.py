"""The code base stays ruff clean and keeps its conventions (values never assigned to), as the README promises."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install '.[test]' brings it)")
    result = subprocess.run([ruff, "check", "--no-cache", str(REPO_ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# The packages' dataclasses are values: a changed one is a new one (dataclasses.replace), never an assignment.
# They are not declared frozen because on Python 3.11 each frozen class compiles three more methods at
# import, 10 ms of a one-step build's 115 ms; this test keeps the rule instead. Listed: what is changed.
PACKAGES = ("parser", "builder", "cache")
MUTABLE_DATACLASSES = {"StepView", "StepContext", "LineSplit", "_Args"}  # state being built, never passed on
MUTABLE_NAMES = {  # (module, variable) assigned to by attribute, and what it holds
    ("builder/cli.py", "exc"): "the PybuildError being rendered",
    ("builder/cli.py", "ctx"): "click's Context: its obj carries the store root, chosen before any namespace",
    ("builder/fs/layer.py", "info"): "a tarfile.TarInfo",
    ("builder/oci/exporter.py", "info"): "a tarfile.TarInfo",
    ("builder/progress.py", "step"): "a StepView",
    ("cache/blobs.py", "out"): "the BlobWriter handed out, given its digest once committed",
    ("parser/dataclass.py", "__repr__"): "a method being made, named after its class",
    ("parser/dataclass.py", "__eq__"): "a method being made, named after its class",
}


def _attribute_targets(node: ast.AST) -> list[ast.Attribute]:
    if isinstance(node, ast.Assign):
        targets = [leaf for target in node.targets for leaf in _unpacked(target)]
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        targets = [node.target]
    else:
        return []
    return [target for target in targets if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)]


def _unpacked(target: ast.expr) -> list[ast.expr]:
    """The names a target assigns: ``a, (b.c, *d) = ...`` gives a, b.c and d."""
    if isinstance(target, ast.Tuple | ast.List):
        return [leaf for element in target.elts for leaf in _unpacked(element)]
    if isinstance(target, ast.Starred):
        return _unpacked(target.value)
    return [target]


def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        name = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(name, ast.Name) and name.id == "dataclass":
            return True
    return False


def _value_mutations(module: str, tree: ast.Module) -> list[str]:
    found = []
    value_classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and _is_dataclass(node)
                     and node.name not in MUTABLE_DATACLASSES]
    in_value_class = {id(inner) for node in value_classes for inner in ast.walk(node)}
    for node in ast.walk(tree):
        for target in _attribute_targets(node):
            owner = target.value.id  # type: ignore[attr-defined]
            if owner in ("self", "cls") and id(node) not in in_value_class:
                continue
            if (module, owner) not in MUTABLE_NAMES:
                found.append(f"{module}:{node.lineno}: {owner}.{target.attr} assigned")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("setattr", "object.__setattr__"):
            found.append(f"{module}:{node.lineno}: {ast.unparse(node.func)}()")
    return found


def test_dataclass_values_are_never_assigned_to() -> None:
    found = []
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            module = path.relative_to(REPO_ROOT).as_posix()
            found += _value_mutations(module, ast.parse(path.read_text(encoding="utf-8"), module))
    assert not found, "a value changed in place (use dataclasses.replace): " + "; ".join(found)


@pytest.mark.parametrize(("source", "expected"), [
    ("@dataclass\nclass A:\n    x: int\n    def bump(self):\n        self.x += 1\n", ["m.py:5: self.x assigned"]),
    ("def f(a):\n    a.x = 1\n", ["m.py:2: a.x assigned"]),
    ("def f(a):\n    a.x, b = 1, 2\n", ["m.py:2: a.x assigned"]),
    ("def f(a):\n    b, (c, *a.x) = 1, (2, 3)\n", ["m.py:2: a.x assigned"]),
    ("def f(a):\n    a[b.c] = 1\n    a.b.c = 2\n", []),
    ("def f(a):\n    object.__setattr__(a, 'x', 1)\n", ["m.py:2: object.__setattr__()"]),
    ("class Plain:\n    def __init__(self):\n        self.x = 1\n", []),
    ("@dataclass\nclass StepView:\n    x: int\n    def bump(self):\n        self.x = 2\n", []),
])
def test_the_value_check_finds_assignments(source: str, expected: list[str]) -> None:
    assert _value_mutations("m.py", ast.parse(source)) == expected


def _imported_modules(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


@pytest.mark.parametrize(("package", "forbidden"), [
    ("cache", "builder"),  # the cache knows nothing of how images are built
    ("parser", "builder"),  # the language comes first in the pipeline
    ("parser", "cache"),
])
def test_packages_import_only_what_comes_before_them(package: str, forbidden: str) -> None:
    found = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for module in _imported_modules(ast.parse(path.read_text(encoding="utf-8"))):
            if module == forbidden or module.startswith(forbidden + "."):
                found.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not found, "; ".join(found)


def test_steps_do_not_import_the_solver() -> None:
    """Instructions give operation values; the solver carries them out: the dependency goes one way."""
    tree = ast.parse((REPO_ROOT / "builder" / "steps.py").read_text(encoding="utf-8"))
    assert not {module for module in _imported_modules(tree) if module.startswith("builder.solver")}
