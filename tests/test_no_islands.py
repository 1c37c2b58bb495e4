"""No module in src/ is imported only by tests, examples or benchmarks (CONTRIBUTING).

A module counts as used when a running part imports it: another src module outside
`butterfly.testing` (a package's `__init__` re-exporting it does not count, the package
would only be carrying it), or an entry point. An example that runs code no node runs
proves nothing about the cluster; this keeps the specification's components the running
ones instead of islands beside them.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
ENTRY_POINTS = {"butterfly", "butterfly.__main__", "butterfly.cli"}
ALLOWED = {
    # the in-memory transport DESIGN.md asks for: N nodes in one process, for component
    # tests; the second implementation of `net.transport.Transport`
    "butterfly.net.memory",
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_by(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Modules of `known` that `path` (module `name`) imports, with their parents."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            named.add(base)
            named.update(f"{base}.{alias.name}" for alias in node.names)
    parents = {".".join(m.split(".")[:i]) for m in named for i in range(1, m.count(".") + 2)}
    return parents & set(known)


def test_every_src_module_is_imported_by_a_running_part() -> None:
    known = modules()
    used = set(ENTRY_POINTS)
    for name, path in known.items():
        carrier = name.startswith("butterfly.testing") or path.name == "__init__.py"
        if carrier and name not in ENTRY_POINTS:
            continue
        used |= imported_by(path, name, known) - {name}
    islands = sorted(
        m for m in known if m not in used | ALLOWED and not m.startswith("butterfly.testing")
    )
    assert islands == [], f"imported only by tests, examples or benchmarks: {islands}"
