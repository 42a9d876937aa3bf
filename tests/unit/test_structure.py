"""Structure of the code base: one place per decision, no import cycles between packages.

- `torch.cuda.is_available()` is called only in tulip_mega/parallel/init.py (`use_cuda()`),
  and the Transformer Engine import probe only in tulip_mega/models/specs.py
  (`use_transformer_engine()`); benchmarks/ are stand-alone scripts and may ask directly.
- The package import graph of tulip_mega/ and tulip_mega/data/ (every import, function-level ones
  included, parsed with `ast`) has no cycle. Nodes: each subpackage
  tulip_mega.<name> and each top-level module tulip_mega.<module>.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("tulip_mega",)

OWNERS = {
    r"torch\.cuda\.is_available\(": {"tulip_mega/parallel/init.py"},
    r"(import_module|find_spec)\(\s*[\"']transformer_engine|^\s*(import|from) transformer_engine\b"
    r"|^\s*from megatron\.core\.extensions\.transformer_engine\b": {"tulip_mega/models/specs.py"},
}


def _python_files():
    for top in SOURCES:
        yield from sorted((REPO / top).rglob("*.py"))


def test_device_and_te_probes_live_in_one_module_each():
    offenders = []
    for pattern, owners in OWNERS.items():
        rx = re.compile(pattern, re.M)
        for path in _python_files():
            rel = path.relative_to(REPO).as_posix()
            if rel not in owners and rx.search(path.read_text()):
                offenders.append(f"{rel}: {pattern} (only {sorted(owners)} may)")
    assert not offenders, "\n".join(offenders)


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "tulip_mega":
        return ".".join(parts[:2]) if len(parts) > 1 else "tulip_mega"
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, dict[str, str]]:
    """{node: {imported node: 'file:line' of one such import}} over every import statement."""
    graph: dict[str, dict[str, str]] = {}
    for path in _python_files():
        mod = _module_name(path)
        src = _node(mod)
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                dst = _node(target)
                # `from tulip_mega import plan` names a module: the longer target decides.
                if dst == "tulip_mega" and target.count(".") >= 1:
                    continue
                if dst and dst != src and dst != "tulip_mega":
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    graph.setdefault(src, {}).setdefault(dst, where)
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of nodes (first node repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, {})):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {}}) is None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between packages:\n  " + "\n  ".join(hops))
