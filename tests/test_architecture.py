"""The package graph: `codetrain` builds on `d3builder`, never the reverse; stages share code only through
the sub-packages below them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
D3BUILDER = ROOT / "d3builder"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports by name: import statements and string arguments of import_module/__import__."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value))
    return names


def test_no_relative_imports_hide_the_graph() -> None:
    """Absolute imports only, so the graph below is complete."""
    relative = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in D3BUILDER.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_d3builder_never_imports_codetrain() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "codetrain")
        for path in D3BUILDER.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # the scan itself sees a codetrain import where there is one
    assert "d3builder.storage.store" in imported_modules(ROOT / "codetrain" / "runlayout.py")


def test_importing_d3builder_loads_no_codetrain_module() -> None:
    code = (
        "import sys, pkgutil, importlib, d3builder\n"
        "for info in pkgutil.walk_packages(d3builder.__path__, 'd3builder.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "import d3builder.cli; d3builder.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'codetrain'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


MODEL_STACK = ("accelerate", "diffusers", "torch", "transformers")


def test_command_line_starts_without_the_model_stack() -> None:
    """Every command module imports and parses without torch, diffusers, transformers or Accelerate: the stack
    loads only where rendering starts (d3builder.generators.runtime)."""
    loaded = f"print(sorted(m for m in {MODEL_STACK!r} if m in sys.modules))\n"
    code = (
        "import sys, d3builder.cli\n"
        "parser = d3builder.cli.build_parser()\n"
        "for argv in (['status', '-m', 'manifests/tiny.yaml'], ['generate', '-m', 'manifests/tiny.yaml', '-g', 'x'],\n"
        "             ['worker', '-m', 'manifests/tiny.yaml', '--stage', 'generate', '-g', 'x']):\n"
        "    parser.parse_args(argv)\n"
        + loaded
        + "import d3builder.generators.runtime\n"
        + loaded
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["[]", str(sorted(MODEL_STACK))]


def test_stages_do_not_import_each_other() -> None:
    """A stage uses what the sub-packages below it offer, never another stage's module."""
    stages = D3BUILDER / "stages"
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.startswith("d3builder.stages."))
        for path in stages.glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize("package", ["core", "storage", "generators", "imaging", "download", "recipe", "embedded"])
def test_lower_packages_do_not_import_stages(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.startswith("d3builder.stages"))
        for path in (D3BUILDER / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
