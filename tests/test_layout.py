"""The package's layout shows the flow (issue 11, item 9): no import circles between modules nor
between subpackages, and a lower layer never imports a higher one.

Every ``import eebench...`` / ``from eebench... import`` in the package's modules counts, at any
depth (a function-level import is a dependency too), except under ``if TYPE_CHECKING:``. The
plugin folders (``eebench.methods``, loaded through the method registry, and ``eebench.tasks``)
are leaves of the check: they import the core, and the core reaches them only through a registry.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "eebench"
PLUGINS = ("eebench.methods", "eebench.tasks")


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(f: Path, name: str, known: set[str]) -> set[str]:
    tree = ast.parse(f.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks are for type checkers only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rsplit(".", 1)[0]
                base = f"{pkg}.{node.module}"
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t.startswith(PLUGINS):
                continue
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and t != "eebench":
                found.add(t)
    return found


#: The layers, bottom up, in the order data flows: a module may import its own layer and the ones
#: below it, never one above. The plugin-facing surface (``eebench.api``) and the commands sit on top.
LAYERS: list[tuple[str, ...]] = [
    # shared helpers, and the method contract with its registry (the model rebuilds a method's
    # modules by name when it loads, and exit policies look up a method's own policies)
    ("eebench", "eebench.errors", "eebench.registry", "eebench.util", "eebench.plugins", "eebench.strategy"),
    ("eebench.data",),  # task data: specs, sources, tokenising, task metrics
    ("eebench.model",),  # backbone adapters, heads, stepper, speed settings
    ("eebench.training",),  # the trainer
    ("eebench.exits",),  # signals, policies, exit rule / sweeps, exit metrics, operating points
    ("eebench.inference",),  # the early-exit engine and its benchmark
    ("eebench.runs",),  # run config, runner, results, tracking
    ("eebench.reports",),  # grouping, tables, plots, analyses
    ("eebench.scale",),  # Ray executor and Tune
    ("eebench.benchcmd", "eebench.cli", "eebench.api"),  # commands and the plugin API
]


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage (``eebench.data.tasks`` -> ``eebench.data``) or,
    for a top-level module, the module itself."""
    return ".".join(module.split(".")[:2])


def _rank(unit: str, layers: list[tuple[str, ...]]) -> int | None:
    return next((i for i, units in enumerate(layers) if unit in units), None)


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(f, m, known) for m, f in mods.items()}
    # A package's __init__ that re-exports its submodules is not a circle with them.
    for m in graph:
        graph[m] = {t for t in graph[m] if not (m.startswith(t + ".") and mods[t].name == "__init__.py")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def _unit_graph(graph: dict[str, set[str]], unit=_unit) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(unit(m), set()).update(unit(t) for t in targets if unit(t) != unit(m))
    return out


def _layer_violations(graph: dict[str, set[str]], layers: list[tuple[str, ...]], unit=_unit) -> list[str]:
    """Every import that goes up the layers, and every unit no layer lists."""
    bad = []
    for m, targets in sorted(graph.items()):
        r = _rank(unit(m), layers)
        if r is None:
            bad.append(f"{m}: its unit {unit(m)} is in no layer (add it to LAYERS)")
            continue
        for t in sorted(targets):
            rt = _rank(unit(t), layers)
            if rt is not None and rt > r:
                bad.append(f"{m} (layer {r}) imports {t} (layer {rt})")
    return bad


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_circles_between_subpackages():
    cycles = _cycles(_unit_graph(_graph()))
    assert not cycles, "subpackage import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_lower_layers_never_import_higher_ones():
    bad = _layer_violations(_graph(), LAYERS)
    assert not bad, "layer order broken: " + "; ".join(bad)


def test_every_subpackage_and_module_has_a_layer():
    units = {_unit(m) for m in _modules()} - set(PLUGINS)
    listed = {u for layer in LAYERS for u in layer}
    assert units == listed, f"not in LAYERS: {sorted(units - listed)}; listed but absent: {sorted(listed - units)}"


def test_the_checks_fail_on_a_bad_graph():
    """The checks above are not vacuous: a synthetic graph with an upward import and a circle
    between subpackages (but none between modules) is caught, and a clean one passes."""
    layers = [("eebench.errors",), ("eebench.data",), ("eebench.runs",)]
    clean = {"eebench.data.tasks": {"eebench.errors"}, "eebench.runs.runner": {"eebench.data.tasks"},
             "eebench.errors": set()}
    assert _layer_violations(clean, layers) == [] and _cycles(_unit_graph(clean)) == []
    upward = {**clean, "eebench.data.sources": {"eebench.runs.results"}, "eebench.runs.results": set()}
    assert _layer_violations(upward, layers) == [
        "eebench.data.sources (layer 1) imports eebench.runs.results (layer 2)"]
    assert _cycles(upward) == []  # no module circle: only the unit graph sees it
    assert _cycles(_unit_graph(upward)) == [["eebench.data", "eebench.runs", "eebench.data"]]
    unlisted = {**clean, "eebench.newpkg.x": set()}
    assert _layer_violations(unlisted, layers) == ["eebench.newpkg.x: its unit eebench.newpkg is in no layer (add it to LAYERS)"]
    # and the real package's graph is what the checks see: the trainer does import the model
    assert "eebench.model.backbone" in _graph()["eebench.training.trainer"]
