"""Structure of the code base: one place per decision, no import cycles between packages.

- `torch.cuda.is_available()` is called only in tulip_mega/parallel/init.py (`use_cuda()`),
  and the Transformer Engine import probe only in tulip_mega/models/specs.py
  (`use_transformer_engine()`); benchmarks/ are stand-alone scripts and may ask directly.
- The package import graph of tulip_mega/ (every import, function-level ones
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


# --- layering rules ---------------------------------------------------------------------------
# (importer node, imported node): the run-time data package does not read the recipe (the
# trainer maps the recipe to the loader's own arguments) nor the offline generators, and the
# losses do not read the data package (the pad id is an argument).
FORBIDDEN = {
    ("tulip_mega.data", "tulip_mega.config"): "the loader takes its own arguments; training/data.py maps the recipe",
    ("tulip_mega.data", "tulip_mega.datagen"): "run-time loading must not need the offline generators",
    ("tulip_mega.losses", "tulip_mega.data"): "the pad id is an argument of the loss",
}


def test_forbidden_package_edges():
    graph = import_graph()
    found = [f"{a} -> {b} ({graph[a][b]}): {why}" for (a, b), why in FORBIDDEN.items() if b in graph.get(a, {})]
    assert not found, "\n".join(found)


# --- function-level imports -------------------------------------------------------------------
def _resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import name loads: itself, or the longest module prefix."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def _imports(node: ast.AST, package: list[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
        return [f"{base}.{a.name}" for a in node.names] + [base]
    return []


def module_imports() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> project modules it imports at its top, [(module, imported, 'file:line')] of the
    imports made inside functions). `if TYPE_CHECKING:` imports do not run. A package's parent
    is not counted: it is already initialising when its submodule is imported."""
    files = {_module_name(p): p for p in _python_files()}
    modules = set(files)
    top: dict[str, set[str]] = {m: set() for m in modules}
    inner: set[tuple[str, str, str]] = set()
    for mod, path in files.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                for target in _imports(child, package):
                    hit = _resolve(target, modules)
                    if hit and hit != mod:
                        if in_function:
                            inner.add((mod, hit, f"{path.relative_to(REPO)}:{child.lineno}"))
                        else:
                            top[mod].add(hit)
                walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        walk(tree, False)
    return top, sorted(inner)


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n == goal:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(graph.get(n, ()))
    return False


def test_no_function_level_import_hides_a_cycle():
    """An import inside a function is fine for a heavy optional dependency, not to dodge a
    cycle: the imported module must not import (at its top, transitively) the importer."""
    top, inner = module_imports()
    hidden = [f"{where}: {mod} imports {dst} inside a function, and {dst} imports {mod}"
              for mod, dst, where in inner if _reaches(top, dst, mod)]
    assert not hidden, "\n".join(hidden)


def test_hidden_cycle_detection_works():
    assert _reaches({"a": {"b"}, "b": {"c"}}, "a", "c") and not _reaches({"a": {"b"}}, "b", "a")


# --- size and shape of the code ----------------------------------------------------------------
MAX_FUNCTION_LINES = 60


def test_no_function_over_60_lines():
    long = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


SHAPES = {  # pattern: (what it is, where it is refused)
    r"Union\[(\w+), list\[\1\]\]": ("one X or a list of them (model parts are always a list)", "tulip_mega/"),
    r"getattr\(self, f[\"']": ("a name-built attribute lookup (use an explicit table)", "tulip_mega/"),
    # torch.autograd.Function's static forward/backward legitimately narrow the signature (losses/)
    r"type:\s*ignore\[override\]": ("an override with another signature (compose instead)", "tulip_mega/data/"),
}


def test_no_union_of_one_or_many_no_name_built_dispatch():
    found = []
    for path in _python_files():
        text = path.read_text()
        for pattern, (what, under) in SHAPES.items():
            if not path.relative_to(REPO).as_posix().startswith(under):
                continue
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not found, "\n".join(found)
