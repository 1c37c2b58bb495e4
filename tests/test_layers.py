"""The import order written in docs/CONTRIBUTING.md, enforced: a package imports only
packages below it (and itself), so the layout keeps showing the architecture."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "butterfly"


def written_order() -> list[str]:
    """The layers as CONTRIBUTING.md writes them: `a < b < c` in its Layout rule."""
    text = (ROOT / "docs" / "CONTRIBUTING.md").read_text()
    match = re.search(r"`(types <[^`]+)`", text)
    assert match, "CONTRIBUTING.md no longer states the import order"
    return [part.strip().removesuffix(".py") for part in match.group(1).split("<")]


def layer_of(module: str) -> str:
    """`butterfly.dataplane.engine` -> `dataplane`; `butterfly.node` -> `node`."""
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("butterfly."))
    return found


def test_every_package_is_in_the_written_order() -> None:
    order = written_order()
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages | modules <= set(order), sorted((packages | modules) - set(order))


def test_packages_import_only_downward() -> None:
    rank = {name: i for i, name in enumerate(written_order())}
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        here = ".".join(rel.parts)
        if len(rel.parts) < 2 or rel.parts[1] in ("__init__", "__main__"):
            continue
        mine = rank[layer_of(here)]
        for target in imports(path):
            if rank[layer_of(target)] > mine:
                upward.append(f"{here} imports {target}")
    assert upward == [], "\n".join(upward)
