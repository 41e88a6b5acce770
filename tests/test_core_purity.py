"""qisd/core is the pure core: no module in it imports the event loop, sockets, threads,
SQLite, the kademlia/rpcudp network classes or Flight (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import qisd.core

FORBIDDEN = {
    "asyncio",
    "socket",
    "selectors",
    "threading",
    "multiprocessing",
    "concurrent",
    "sqlite3",
    "time",
    "kademlia",
    "rpcudp",
    "uvloop",
    "pyarrow.flight",
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def test_the_core_imports_no_io() -> None:
    core = Path(qisd.core.__file__).parent
    modules = sorted(core.glob("*.py"))
    assert len(modules) > 5
    bad = {p.name: sorted(n for n in imported(p) if forbidden(n)) for p in modules}
    assert {name: found for name, found in bad.items() if found} == {}


def test_the_check_sees_an_import() -> None:
    assert forbidden("asyncio") and forbidden("kademlia.routing") and not forbidden("timeit")
