"""The house rules of the source tree, checked from the code itself: no import circle between
modules (imports inside functions count: they are dependencies all the same), the eval path
does not load the trainer, and no function is longer than 60 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "fashionfuse").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, node: ast.ImportFrom | ast.Import, mods) -> set[str]:
    """fashionfuse modules one import statement loads (a submodule loads its packages too)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[:len(package) - node.level + 1] if node.level else []
        stem = ".".join(base + ([node.module] if node.module else []))
        names = [f"{stem}.{a.name}" for a in node.names if f"{stem}.{a.name}" in mods] or [stem]
    out = set()
    for name in names:
        parts = name.split(".")
        for k in range(2, len(parts) + 1):
            target = ".".join(parts[:k])
            if target in mods and target != module and not module.startswith(target + "."):
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the fashionfuse modules it imports, anywhere in its body; a package's
    `__init__` counts with its module-level imports only (its lazy `__getattr__` re-exports
    load nothing until used)."""
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if path.name == "__init__.py" else list(ast.walk(tree))
        graph[module] = set().union(*[_imported(module, path, n, mods) for n in nodes
                                      if isinstance(n, (ast.Import, ast.ImportFrom))])
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circle_between_modules():
    graph = import_graph()
    cycles = import_cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]
    assert not cycles, detail


def test_the_checker_sees_a_circle():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_eval_path_does_not_load_the_trainer():
    code = ("import sys, fashionfuse.evaluate, fashionfuse.evaluate.harness, fashionfuse.evaluate.lm_eval_run, "
            "fashionfuse.evaluate.shared_context, fashionfuse.adapters.peft_layers; "
            "print(sorted(m for m in sys.modules if m.startswith('fashionfuse.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_function_over_60_lines():
    long = []
    for path in (SRC / "fashionfuse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines})")
    assert not long, long


# the package's layers, bottom to top: what every stage shares, the stages, the search (it
# scores with the evaluate stage's lm-eval wrapper), what runs the stages together, the CLI
STAGES = ("curate", "train", "evaluate", "deploy")
LAYERS = {"shared": 0, **{s: 1 for s in STAGES}, "search": 2, "experiments": 3, "cli": 4}
# config validates search.method / search.operator against the registries users plug into
ALLOWED = {("fashionfuse.config", "fashionfuse.search.registry"),
           ("fashionfuse.config", "fashionfuse.search")}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "cli" if module in ("fashionfuse.cli", "fashionfuse.__main__") else "shared"


def test_no_stage_imports_one_above_it():
    """Top-level modules and the adapters/fusion packages are what every stage shares; a stage
    imports none of the others at its level, nothing imports a layer above its own."""
    wrong = []
    for a, targets in import_graph().items():
        for b in targets:
            la, lb = layer_of(a), layer_of(b)
            if (a, b) in ALLOWED:
                continue
            if LAYERS[lb] > LAYERS[la] or (la != lb and la in STAGES and lb in STAGES):
                wrong.append(f"{a} ({la}) -> {b} ({lb})")
    assert not wrong, wrong


def test_no_top_level_module_belongs_to_one_stage():
    """A module at the top of the package is imported by more than one stage folder (or by
    none: the CLI's own helpers), never by exactly one."""
    graph = import_graph()
    single = []
    for module in graph:
        if module.count(".") != 1 or layer_of(module) != "shared" or module == "fashionfuse.cli":
            continue
        users = {layer_of(a) for a, targets in graph.items() if module in targets}
        stage_users = users & set(STAGES + ("search", "experiments"))
        if len(stage_users) == 1 and users <= stage_users | {"cli"}:
            single.append(f"{module}: only {sorted(users)}")
    assert not single, single
