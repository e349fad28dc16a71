"""The architecture the folders show, checked: data flows cli → stages → components. No component
imports a stage or the CLI, no stage imports another stage, and bltool modules import each other at the
top of the file (an import hidden inside a function is how the old models ↔ adapters ↔ compression
circle went unnoticed); only the CLI defers its stage imports, to answer --help without torch."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bltool"
LAZY_OK = {"cli.py", "__init__.py"}  # `bltool --help` and `import bltool` stay light


def _imports(path: Path):
    """(imported bltool module, at top level?) for every bltool import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bltool"):
            names = [node.module] if node.module != "bltool" else [f"bltool.{a.name}" for a in node.names]
            for name in names:
                yield name, id(node) in top


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), path


def test_components_never_import_a_stage_or_the_cli():
    for rel, path in _modules():
        if rel.startswith("stages/") or rel in ("cli.py", "__main__.py"):
            continue
        for name, _ in _imports(path):
            assert not name.startswith(("bltool.stages", "bltool.cli")), f"bltool/{rel} imports {name}"


def test_stages_never_import_each_other():
    for rel, path in _modules():
        if rel.startswith("stages/"):
            for name, _ in _imports(path):
                assert not name.startswith("bltool.stages"), f"bltool/{rel} imports {name}"


def test_bltool_imports_are_at_the_top():
    for rel, path in _modules():
        if rel in LAZY_OK:
            continue
        hidden = [name for name, top in _imports(path) if not top]
        assert not hidden, f"bltool/{rel} imports {hidden} inside a function"
