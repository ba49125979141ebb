"""The package's layers never reach back up (docs/architecture.md, "Data flow"), and no module
imports its own importers. Imports are read with `ast` (function-level ones included, those under
`if TYPE_CHECKING:` left out: they never run), so the test sees an upward import before
anything runs it.

    compat                       nothing of ours
    parallel (the package file)  devices, backends, collectives: compat only
    data/, model/                parallel; model/ never imports training/, checkpoint/, inference/ or hf/
    run_config, arguments        the flags and the typed RunConfig
    parallel/*.py, checkpoint/   the data-parallel engines and the checkpoint format: never training/
    training/                    the loop
    inference/, hf/              never training/
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_lcot"

# module prefix -> prefixes it must not import
FORBIDDEN = {
    "megatron_lcot.compat": ("megatron_lcot.",),
    "megatron_lcot.data": (
        "megatron_lcot.model",
        "megatron_lcot.training",
        "megatron_lcot.checkpoint",
        "megatron_lcot.inference",
        "megatron_lcot.hf",
        "megatron_lcot.run_config",
        "megatron_lcot.arguments",
    ),
    "megatron_lcot.model": (
        "megatron_lcot.training",
        "megatron_lcot.checkpoint",
        "megatron_lcot.inference",
        "megatron_lcot.hf",
        "megatron_lcot.arguments",
    ),
    "megatron_lcot.parallel": (
        "megatron_lcot.training",
        "megatron_lcot.checkpoint",
        "megatron_lcot.inference",
        "megatron_lcot.hf",
    ),
    "megatron_lcot.checkpoint": ("megatron_lcot.training", "megatron_lcot.inference", "megatron_lcot.hf"),
    "megatron_lcot.run_config": (
        "megatron_lcot.training",
        "megatron_lcot.checkpoint",
        "megatron_lcot.inference",
        "megatron_lcot.hf",
        "megatron_lcot.arguments",
    ),
    "megatron_lcot.inference": ("megatron_lcot.training",),
    "megatron_lcot.hf": ("megatron_lcot.training",),
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """Every megatron_lcot module `path` imports (`from megatron_lcot import parallel` counts as
    megatron_lcot.parallel)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: never executed
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("megatron_lcot")}


def _graph() -> dict:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {imported for imported in _imports(path) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix.rstrip(".") or module.startswith(prefix.rstrip(".") + ".")


def _layer_rules(module: str) -> tuple:
    """The forbidden prefixes of the most specific rule for `module`: the package file
    megatron_lcot.parallel (devices) and its engines share the rules of parallel/."""
    matching = [prefix for prefix in FORBIDDEN if _is_under(module, prefix)]
    return FORBIDDEN[max(matching, key=len)] if matching else ()


def upward_imports(graph: dict) -> list:
    return sorted(
        f"{module} imports {imported}"
        for module, imports in graph.items()
        for imported in imports
        for forbidden in _layer_rules(module)
        if _is_under(imported, forbidden) or (forbidden == "megatron_lcot." and imported != module)
    )


def import_cycles(graph: dict) -> list:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(_graph()) == []


def test_no_import_cycles():
    assert import_cycles(_graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    """Proves the two checks can fail: an inference module importing training, and a cycle."""
    graph = _graph()
    graph["megatron_lcot.inference.loading"] = graph["megatron_lcot.inference.loading"] | {
        "megatron_lcot.training.providers"
    }
    assert upward_imports(graph) == [
        "megatron_lcot.inference.loading imports megatron_lcot.training.providers"
    ]
    graph["megatron_lcot.model.config"] = graph["megatron_lcot.model.config"] | {
        "megatron_lcot.model.halting"
    }
    assert ["megatron_lcot.model.config", "megatron_lcot.model.halting"] in import_cycles(graph)
