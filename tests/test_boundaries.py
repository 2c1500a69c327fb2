"""The three parts import one way only: the lab and the hub, and the hospital's site kernel, meet in ``flip_common``.

A hospital installs ``site_kernel`` and ``flip_common``; what it must trust of the lab's code is what ``flip_common``
holds. These tests read every module's imports (at any depth, including imports inside functions) from the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level package names imported by each module of ``package``, relative imports resolved."""
    found: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        found[str(path.relative_to(root))] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [("flip_common", {"flip_lab", "site_kernel"}), ("site_kernel", {"flip_lab"}), ("flip_lab", {"site_kernel"})],
)
def test_no_part_imports_the_other_side(package: str, forbidden: set[str]) -> None:
    crossing = {module: sorted(names & forbidden) for module, names in _imports(package).items() if names & forbidden}
    assert crossing == {}


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from site_kernel.data import prepare\n")
    (tmp_path / "pkg" / "b.py").write_text("from . import a\nimport flip_common.net as n\n")
    assert _imports("pkg", tmp_path) == {"pkg/a.py": {"site_kernel"}, "pkg/b.py": {"pkg", "flip_common"}}
