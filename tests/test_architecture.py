"""Data flows one way: errors at the bottom, data and step free of the run config, no cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastres"


def imports() -> dict[str, set[str]]:
    """Each fastres module and the fastres modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastres"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("fastres")}
        graph[name] = found
    modules = set(graph)
    return {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}


def test_errors_import_nothing_and_data_step_and_fusion_know_no_run_config() -> None:
    graph = imports()
    assert graph["fastres.errors"] == set()
    for module, deps in graph.items():
        if module.startswith("fastres.data") or module in ("fastres.step", "fastres.fused"):
            assert not deps & {"fastres.config", "fastres.cli", "fastres.train"}, module


def test_recipe_imports_nothing() -> None:
    """The paper's constants sit at the bottom with the errors, so anything may read them."""
    assert imports()["fastres.recipe"] == set()


def test_no_import_cycles() -> None:
    graph = imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])
