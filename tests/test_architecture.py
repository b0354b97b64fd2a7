"""The project's structure, checked: no import cycle anywhere (module level and lazy imports inside functions
alike), commands do not import each other, and the library never imports a command."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "lite3r_kernels", "backbones": "lite3r_backbones", "recon": "lite3r_recon", "cli": "lite3r_cli"}


def _modules() -> dict[str, Path]:
    """Installed module name -> file, for lite3r.py and every .py under the mapped folders."""
    mods = {"lite3r": REPO / "lite3r.py"}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (anywhere in the file, resolved to the most specific known module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


GRAPH = {n: _imports(n, p, set(_modules())) for n, p in _modules().items()}


def _parents_only(graph):
    """Drop edges to a package's own __init__ from its submodules (Python imports the parent package first anyway;
    an __init__ that imports its submodules is not a cycle with them)."""
    return {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}


def test_no_import_cycles():
    graph = _parents_only(GRAPH)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_commands_do_not_import_each_other_and_the_library_no_command():
    commands = {n for n in GRAPH if n.startswith("lite3r_cli.") and n != "lite3r_cli.app"}
    parts = {"lite3r_cli.bench": {"lite3r_cli.bench_attention", "lite3r_cli.bench_profile"}}  # one command's modules
    for n in commands:
        bad = {m for m in GRAPH[n] & commands if m not in parts.get(n, set())}
        assert not bad, f"{n} imports the command module(s) {sorted(bad)}"
    for n, deps in GRAPH.items():
        if not n.startswith("lite3r_cli"):
            assert not any(m.startswith("lite3r_cli") for m in deps), f"library module {n} imports a command: {deps}"


def test_core_imports_only_torch_jaxtyping_beartype():
    tree = ast.parse((REPO / "lite3r.py").read_text())
    top = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
           for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names if getattr(n, "level", 0) == 0}
    assert top <= {"torch", "jaxtyping", "beartype", "dataclasses", "functools", "importlib", "inspect", "math", "os",
                   "collections", "__future__"}, top
