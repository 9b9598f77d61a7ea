"""The package's shape stays what the folder names say: the import contract of pyproject.toml
([tool.importlinter]: layers, a torch-only core) holds, and no module imports itself through others."""

import subprocess
import sys
from pathlib import Path

import grimp


def import_cycles(package: str) -> list[list[str]]:
    """Every strongly connected group of more than one module in `package`'s import graph (Tarjan)."""
    graph = grimp.build_graph(package)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in edges:
        if m not in index:
            visit(m)
    return cycles


def test_no_module_imports_itself_through_others():
    assert import_cycles("stableopd") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "loop"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from loop import b\n")
    (pkg / "b.py").write_text("def f():\n    from loop import c\n")  # a function-level import counts too
    (pkg / "c.py").write_text("import loop.a\n")
    (pkg / "d.py").write_text("import loop.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("loop") == [["loop.a", "loop.b", "loop.c"]]


def test_the_import_contract_holds():
    lint = Path(sys.executable).with_name(
        "lint-imports"
    )  # import-linter's command, installed with the dev extra
    done = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout
