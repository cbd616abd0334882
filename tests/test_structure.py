"""The shape of the code: data flows one way, so no module of sti imports one that imports it
back (at any depth, function-local imports included)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "sti"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The sti modules a file imports (a package's __init__ stands for the package)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {n for n in names if (SRC.parent / (n.replace(".", "/") + ".py")).exists()
                    or (SRC.parent / n.replace(".", "/")).is_dir()} or {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m == "sti" or m.startswith("sti.")} - {me}


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in SRC.rglob("*.py")}
    graph.pop("sti")  # the package root re-exports the public API; no module imports it
    assert all("sti" not in deps for deps in graph.values())
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
