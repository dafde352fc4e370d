"""vitune's imports point one way and form no circle (STYLE.md: "Imports point one way").

The graph is read from the source with `ast`, never by importing, and holds every internal
import (`from vitune... import`, `import vitune...`): at module level and inside functions
alike, since a function-level import is still an edge a reader has to follow. Run with `-s`
to see the counts.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT_PACKAGE = "vitune"

# Which layers each layer may import; a layer always may import its own modules.
# The order of the layers, top to bottom:
#   cli, ui  ->  train / infer / export / eval  ->  data, models  ->  config  ->  errors
# Among the middle layer train may use eval, infer, models and data; eval may use infer;
# export may use models and data. models may use data (a tiny model's chat template, the
# corpus of a vocabulary), data never models: rows become tokens without loading a model.
# ui is started by `vitune ui` and never imports the CLI. `vitune` is the package's own
# `__init__` (its version); `__main__` is `python -m vitune`. `bundled` finds the package's data
# and examples (its example scripts are the user's programs, not modules of the package).
_BOTTOM = {"errors", "vitune", "bundled"}
_BASE = _BOTTOM | {"config"}
ALLOWED = {
    "__main__": {"cli"},
    "cli": {"ui", "train", "infer", "export", "eval", "data", "models"} | _BASE,
    "ui": {"train", "infer", "export", "eval", "data", "models"} | _BASE,
    "train": {"eval", "infer", "data", "models"} | _BASE,
    "eval": {"infer", "data", "models"} | _BASE,
    "infer": {"data", "models"} | _BASE,
    "export": {"data", "models"} | _BASE,
    "models": {"data"} | _BASE,
    "data": _BASE,
    "config": _BOTTOM,
    "errors": set(),
    "vitune": set(),
    "bundled": {"errors"},
}
# Layers whose function-level imports need no reason comment: the CLI and the UI import each
# command's modules when the command runs, so that `vitune --help` stays fast.
LAZY_BY_DESIGN = {"cli", "ui"}
# The reason a function-level internal import stays in its function, on its line or the line
# above: `# lazy: torch at start-up`, `# lazy: optional dependency`, `# lazy: cycle ...`.
REASON = re.compile(r"#\s*lazy:\s*\S")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "vitune.data.templates"
    target: str  # the imported module, e.g. "vitune.data.jinja_template"
    line: int
    in_function: bool
    has_reason: bool


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(src: Path = SRC) -> dict[str, Path]:
    examples = src / ROOT_PACKAGE / "bundled" / "examples"
    return {module_name(path, src): path for path in sorted((src / ROOT_PACKAGE).rglob("*.py"))
            if examples not in path.parents}


def layer(module: str) -> str:
    """The top-level package or module under vitune: "data" for vitune.data.templates."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a module: `vitune.data.templates.TEMPLATES`
    (an attribute of a module) resolves to vitune.data.templates."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, source: str, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: `from . import x` inside vitune.data.templates
            package = source.split(".")
            if modules[source].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        # `from vitune.x import y` imports the submodule vitune.x.y when there is one, else
        # the name y from vitune.x
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    targets = []
    for name in names:
        if name != ROOT_PACKAGE and not name.startswith(ROOT_PACKAGE + "."):
            continue
        target = _resolve(name, modules)
        # importing vitune.x.y first runs vitune/x/__init__.py: an edge to each package on the
        # way that the importer is not already inside
        parts = target.split(".")
        for i in range(2, len(parts)):
            package = ".".join(parts[:i])
            if not (source == package or source.startswith(package + ".")):
                targets.append(package)
        targets.append(target)
    return list(dict.fromkeys(targets))


def _comments(text: str) -> dict[int, str]:
    return {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT}


def _import_nodes(tree: ast.AST, in_function: bool = False):
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _import_nodes(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def imports_of(source: str, modules: dict[str, Path]) -> list[Import]:
    text = modules[source].read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(modules[source]))
    comments = _comments(text)
    lines = text.splitlines()
    found = [(node, in_function) for node, in_function in _import_nodes(tree)]
    import_lines = {line for node, _ in found for line in range(node.lineno, node.end_lineno + 1)}

    def has_reason(node: ast.stmt) -> bool:
        # a reason on the statement's own lines, or in the comment lines right above it; one
        # comment may stand for a block of imports under it
        if any(REASON.search(comments.get(line, "")) for line in range(node.lineno, node.end_lineno + 1)):
            return True
        line = node.lineno - 1
        while line >= 1:
            stripped = lines[line - 1].strip()
            if stripped.startswith("#"):
                if REASON.search(stripped):
                    return True
            elif line not in import_lines:
                return False
            elif REASON.search(comments.get(line, "")):
                return True
            line -= 1
        return False

    edges = []
    for node, in_function in found:
        reason = in_function and has_reason(node)
        for target in _targets(node, source, modules):
            if target != source:
                edges.append(Import(source, target, node.lineno, in_function, reason))
    return edges


def import_graph(src: Path = SRC) -> list[Import]:
    modules = all_modules(src)
    return [edge for source in modules for edge in imports_of(source, modules)]


def cycles(edges: list[Import]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected group of modules (Tarjan) as (a shortest cycle through its first
    module, as a chain whose last is its first; all the group's modules)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        # iterative Tarjan: the graph is small, but recursion depth should not depend on it
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[current] = min(low[current], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[current])
                if low[current] == index[current]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == current:
                            break
                    if len(group) > 1:
                        groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = [(_chain(min(group), graph, group), sorted(group)) for group in groups]
    return sorted(found)


def _chain(start: str, graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest chain start -> ... -> start inside a strongly connected group."""
    previous: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        current = queue.pop(0)
        for child in sorted(graph[current] & group):
            if child == start:
                path = [current]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if child not in previous:
                previous[child] = current
                queue.append(child)
    raise AssertionError(f"{start} is in a cycle group but no way leads back to it")


def _where(edge: Import) -> str:
    path = all_modules()[edge.source].relative_to(SRC / ROOT_PACKAGE)
    return f"{path}:{edge.line}" + (" (in a function)" if edge.in_function else "")


def _described(chain: list[str], group: list[str], edges: list[Import]) -> str:
    lines = [" -> ".join(chain)]
    for source, target in zip(chain, chain[1:]):
        edge = next(e for e in edges if e.source == source and e.target == target)
        lines.append(f"    {_where(edge)}: {source} imports {target}")
    if len(group) > len(chain) - 1:
        lines.append(f"    one of the circles among these {len(group)} modules: {', '.join(group)}")
    return "\n".join(lines)


EDGES = import_graph()
LAYERS = sorted({layer(module) for module in all_modules()})


def test_the_graph_holds_the_imports_a_reader_follows():
    # a sample of edges every later test relies on: submodule vs name, package __init__,
    # function-level imports
    modules = all_modules()
    assert {"vitune", "vitune.cli", "vitune.config", "vitune.data.templates"} <= set(modules)
    assert layer("vitune.data.templates") == "data" and layer("vitune.config") == "config"
    edges = {(e.source, e.target) for e in EDGES}
    assert ("vitune.config", "vitune.errors") in edges
    assert ("vitune.__main__", "vitune.cli") in edges
    assert any(e.in_function for e in EDGES) and any(not e.in_function for e in EDGES)


def test_resolves_submodules_names_packages_and_reasons(tmp_path):
    package = tmp_path / ROOT_PACKAGE
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "config.py").write_text("X = 1\n")
    (package / "data" / "a.py").write_text(
        "from vitune import config\n"
        "from vitune.data.b import NAME\n"
        "def f():\n"
        "    # lazy: a reason above a block\n"
        "    from vitune.data import b\n"
        "    import vitune.config\n"
        "def g():\n"
        "    from vitune.data.b import NAME  # no reason here\n"
    )
    (package / "data" / "b.py").write_text("NAME = 1\ndef h():\n    import vitune.data.a  # lazy: cycle\n")
    edges = import_graph(tmp_path)
    got = {(e.source, e.target, e.line, e.in_function, e.has_reason) for e in edges}
    assert got == {
        ("vitune.data.a", "vitune.config", 1, False, False),
        ("vitune.data.a", "vitune.data.b", 2, False, False),
        ("vitune.data.a", "vitune.data.b", 5, True, True),
        ("vitune.data.a", "vitune.config", 6, True, True),
        ("vitune.data.a", "vitune.data.b", 8, True, False),
        ("vitune.data.b", "vitune.data.a", 3, True, True),
    }
    assert cycles(edges) == [(["vitune.data.a", "vitune.data.b", "vitune.data.a"], ["vitune.data.a", "vitune.data.b"])]


def test_a_submodule_import_runs_its_package_init(tmp_path):
    package = tmp_path / ROOT_PACKAGE
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("app = 1\nfrom vitune.cli import chat\n")
    (package / "cli" / "chat.py").write_text("from vitune.cli import app\n")
    (package / "ui.py").write_text("from vitune.cli.chat import x\n")
    edges = {(e.source, e.target) for e in import_graph(tmp_path)}
    assert edges == {("vitune.cli", "vitune.cli.chat"), ("vitune.cli.chat", "vitune.cli"),
                     ("vitune.ui", "vitune.cli"), ("vitune.ui", "vitune.cli.chat")}


@pytest.mark.parametrize("name", LAYERS)
def test_no_import_cycle(name):
    found = [(chain, group) for chain, group in cycles(EDGES) if any(layer(module) == name for module in group)]
    if found:
        pytest.fail(f"{len(found)} import cycle(s) through {name}/:\n"
                    + "\n".join(_described(chain, group, EDGES) for chain, group in found), pytrace=False)


@pytest.mark.parametrize("name", LAYERS)
def test_imports_point_down_the_layers(name):
    assert name in ALLOWED, f"{name} is a new top-level module or package: give it a row in ALLOWED"
    wrong = [e for e in EDGES if layer(e.source) == name and layer(e.target) not in ALLOWED[name] | {name}]
    if wrong:
        pytest.fail(f"{name}/ may import only {sorted(ALLOWED[name])}:\n" + "\n".join(
            f"    {_where(e)}: {e.source} imports {e.target}" for e in wrong), pytrace=False)


@pytest.mark.parametrize("name", sorted(set(LAYERS) - LAZY_BY_DESIGN))
def test_function_level_imports_say_why(name):
    silent = sorted({(e.source, e.line): e for e in EDGES
                     if layer(e.source) == name and e.in_function and not e.has_reason}.values(),
                    key=lambda e: (e.source, e.line))
    if silent:
        pytest.fail(
            f"{len(silent)} function-level import(s) in {name}/ without a `# lazy: <reason>` comment; "
            "move each to the top of its module, or say why it stays (on its line or the line above):\n"
            + "\n".join(f"    {_where(e)}: {e.target}" for e in silent), pytrace=False)


def test_count_of_internal_imports():
    # import statements, not edges: `from vitune.data import a, b` is one
    statements = {(e.source, e.line, e.in_function) for e in EDGES}
    counts = Counter((layer(source), in_function) for source, _, in_function in statements)
    print(f"\ninternal import statements: {len(statements)}, "
          f"{sum(1 for s in statements if s[2])} inside functions")
    for name in LAYERS:
        print(f"    {name:10} module level {counts[name, False]:4}   in functions {counts[name, True]:4}")
    assert statements
