"""Every use of another library's private API is in megatron_lcot/compat.py (docs/architecture.md).

Read with `ast`: outside compat.py, no module of the package imports a private module
(`from torch._dynamo import ...`, `import torch._dynamo`), imports a private name, or reads an
attribute whose name starts with one underscore (also through `getattr`) unless the package
itself defines that name (its own private helpers, attributes it sets, the hooks it overrides:
a library attribute that shares such a name goes unseen). hf/modeling_lcot.py is the one
exception: it must stand alone for `trust_remote_code`, so it cannot import compat.py.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_lcot"
ALLOWED = {PACKAGE / "compat.py", PACKAGE / "hf" / "modeling_lcot.py"}
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _names_defined(tree: ast.AST) -> set:
    """Functions, classes, attributes and variables a module defines or assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def private_uses(modules: dict) -> list:
    """[(path, line, what)] for each private use of another library in `modules` {path: source}."""
    trees = {path: ast.parse(source) for path, source in modules.items()}
    ours = set().union(*(_names_defined(tree) for path, tree in trees.items() if path not in ALLOWED))
    found = []
    for path, tree in trees.items():
        if path in ALLOWED:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if any(_private(part) for part in node.module.split(".")):
                    found.append((path, node.lineno, node.module))
                found += [(path, node.lineno, alias.name) for alias in node.names if _private(alias.name)]
            elif isinstance(node, ast.Import):
                found += [
                    (path, node.lineno, alias.name)
                    for alias in node.names
                    if any(_private(part) for part in alias.name.split("."))
                ]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and node.args[1].value not in ours
            ):
                found.append((path, node.lineno, node.args[1].value))
            elif (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and node.attr not in ours | NAMEDTUPLE_API
            ):
                found.append((path, node.lineno, node.attr))
    return found


def _package_sources() -> dict:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_private_apis_are_used_in_compat_only():
    assert private_uses(_package_sources()) == []


def test_a_private_use_outside_compat_is_found():
    sources = _package_sources()
    causal_blocks = PACKAGE / "model" / "causal_blocks.py"
    sources[causal_blocks] += "\n\ntorch.ops.aten._scaled_dot_product_flash_attention\n"
    sources[causal_blocks] += "from torch._dynamo import config\n"
    sources[causal_blocks] += "from torch.distributed.distributed_c10d import _get_default_store\n"
    sources[causal_blocks] += "import torch._dynamo.config\n"
    sources[causal_blocks] += "getattr(torch.cuda, '_lazy_init')\n"
    assert sorted((path.name, what) for path, _, what in private_uses(sources)) == [
        ("causal_blocks.py", "_get_default_store"),
        ("causal_blocks.py", "_lazy_init"),
        ("causal_blocks.py", "_scaled_dot_product_flash_attention"),
        ("causal_blocks.py", "torch._dynamo"),
        ("causal_blocks.py", "torch._dynamo.config"),
    ]
