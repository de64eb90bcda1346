"""The layering of docs/architecture.md, read from the source with `ast` (nothing is imported):
no import cycle between modules or between layers, no import up a layer (function-level imports
count), no private name imported from another module, attacks that see only signals and the
query oracle, and few modules loose at the package root."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

#: the repository's src/ (found upwards, wherever the tests folder files this test)
SRC = next(p for p in Path(__file__).resolve().parents if (p / "src" / "crl").is_dir()) / "src"

#: Each layer may import only layers of a LOWER rank (and itself); layers of equal rank are
#: siblings that never import each other. A new module at the root or a new subpackage of crl
#: must be given its rank here (and its line in docs/architecture.md).
RANKS: dict[str, int] = {
    "crl.core": 0,
    "crl.config": 1,
    "crl.rundir": 2, "crl.train_options": 2,
    "crl.data": 3,
    "crl.models": 4, "crl.losses": 4,
    "crl.training": 5, "crl.attacks": 5,
    "crl.defenses": 6,
    "crl.engine": 7,
    "crl.audit": 8,
    "crl.report": 9, "crl.tune": 9,
    "crl.commands": 10,
    "crl": 11,            # crl/__init__.py: the public API (crl.audit_training, crl.load_model)
    "crl.cli": 12,
}
#: the one name a lower layer may take from the package itself (code_version records it)
FROM_PACKAGE_ROOT = {"__version__"}
#: the attacks are functions of signals; label-only attacks also ask the query oracle
ATTACKS_MAY_IMPORT = ("crl.core", "crl.attacks", "crl.models.query")
MAX_LOOSE_MODULES = 8


@dataclass(frozen=True)
class Import:
    source: str          # importing module
    target: str          # imported module
    names: tuple[str, ...]
    line: int
    in_function: bool

    def where(self) -> str:
        scope = "function-level " if self.in_function else ""
        return f"{self.source}:{self.line} {scope}import of {self.target}"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "crl").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def _imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    inside = _function_nodes(tree)
    out = []
    for node in ast.walk(tree):
        local = id(node) in inside
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, (), node.lineno, local) for a in node.names
                    if a.name.split(".")[0] == "crl"]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node)
            if target.split(".")[0] != "crl":
                continue
            names = tuple(a.name for a in node.names)
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            out += [Import(module, f"{target}.{n}", (), node.lineno, local) for n in submodules]
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                out.append(Import(module, target, rest, node.lineno, local))
    return out


IMPORTS = [imp for module in MODULES for imp in _imports_of(module)]


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "crl"


def _edges() -> list[Import]:
    """Imports between two modules of crl, leaving out `from crl import __version__`."""
    return [i for i in IMPORTS if i.target in MODULES and i.target != i.source
            and not (i.target == "crl" and set(i.names) <= FROM_PACKAGE_ROOT and i.names)]


def _cycles(nodes: set[str], edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    graph: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def test_the_source_is_read():
    assert {"crl", "crl.cli", "crl.core.errors", "crl.audit"} <= set(MODULES)
    assert len(_edges()) > 100


def test_no_import_cycle_between_modules():
    """Function-level imports count: a cycle hidden in a function is still a cycle."""
    edges = {(i.source, i.target) for i in _edges()}
    assert _cycles(set(MODULES), edges) == []


def test_no_import_cycle_between_layers():
    edges = {(_layer(i.source), _layer(i.target)) for i in _edges()
             if _layer(i.source) != _layer(i.target)}
    assert _cycles({_layer(m) for m in MODULES}, edges) == []


def test_every_layer_has_a_rank():
    """A new root module or subpackage is placed in the layering on purpose."""
    assert sorted({_layer(m) for m in MODULES} - set(RANKS)) == []


def upward(edges: list[Import]) -> list[str]:
    return [f"{i.where()} (rank {RANKS.get(_layer(i.source))} imports rank "
            f"{RANKS.get(_layer(i.target))})" for i in edges
            if _layer(i.source) != _layer(i.target)
            and not RANKS.get(_layer(i.target), 99) < RANKS.get(_layer(i.source), -1)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private(imports: list[Import]) -> list[str]:
    """`from m import _x` anywhere; a private module (crl.defenses._common) from outside its
    own package."""
    bad = [f"{i.where()}: {n}" for i in imports for n in i.names if _private(n)]
    for i in imports:
        parts = i.target.split(".")
        for k, part in enumerate(parts):
            if _private(part) and not (i.source + ".").startswith(".".join(parts[:k]) + "."):
                bad.append(f"{i.where()}: private module {part}")
    return bad


def impure_attacks(imports: list[Import]) -> list[str]:
    return [i.where() for i in imports if i.source.startswith("crl.attacks")
            and not any(i.target == a or i.target.startswith(a + ".") for a in ATTACKS_MAY_IMPORT)]


def test_no_import_runs_up_a_layer():
    assert upward(_edges()) == []


def test_the_audit_stages_never_import_the_report():
    """The commands layer writes reports (crl.commands.audit hands crl.report to run_audit)."""
    assert [i.where() for i in _edges() if _layer(i.source) == "crl.audit"
            and _layer(i.target) == "crl.report"] == []


def test_no_private_name_imported_from_another_module():
    assert private(IMPORTS) == []


def test_attacks_see_only_signals_and_the_query_oracle():
    """No model, data, training or evaluation code in crl.attacks: gradients and logits are
    computed at signal extraction (crl.audit, crl.models.gradients)."""
    assert impure_attacks(IMPORTS) == []


def test_few_modules_loose_at_the_package_root():
    loose = sorted(p.name for p in (SRC / "crl").glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


@pytest.mark.parametrize("bad, check", [
    (Import("crl.audit.pipeline", "crl.report", ("write_report",), 1, True), upward),
    (Import("crl.core.rundir", "crl.config", ("FIELD_SPECS",), 1, True), upward),
    (Import("crl.data.splits", "crl.data.types", ("_check",), 1, False), private),
    (Import("crl.tune.space", "crl.defenses._common", (), 1, False), private),
    (Import("crl.attacks.threshold", "crl.models.evaluation", ("eval_batches",), 1, False),
     impure_attacks),
])
def test_the_checks_catch_a_violation(bad, check):
    """Each check names the import that breaks it (the layering above is not vacuous)."""
    assert check([bad]) and bad.source in check([bad])[0]


def test_a_cycle_is_found():
    assert _cycles({"a", "b", "c"}, {("a", "b"), ("b", "c"), ("c", "a")}) == [["a", "b", "c"]]
    assert _cycles({"a", "b"}, {("a", "b")}) == []


def test_no_function_in_src_is_over_50_lines():
    """Small functions (the project's standard): every def in src/crl spans at most 50 lines,
    decorators excluded, docstring included."""
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > 50:
                    long.append(f"{module}.{node.name}: {span} lines")
    assert long == []
