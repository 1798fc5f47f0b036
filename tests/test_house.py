"""The shape of the package: no import cycle among hf_prune modules (imports inside functions count), and no
module imports a ``_private`` name from another package. An AST walk over the source, no imports executed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hf_prune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every import statement anywhere in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (target, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _package(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_the_walk_sees_the_package() -> None:
    assert {"hf_prune.config", "hf_prune.registry", "hf_prune.core.blocks", "hf_prune.oneshot.pipeline"} <= set(MODULES)
    assert "hf_prune.registry" in _graph()["hf_prune.config"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


def test_no_private_name_imported_across_packages() -> None:
    bad = [f"{m} imports {name} from {target}" for m in MODULES for target, name in _imports(m)
           if name and name.startswith("_") and not name.startswith("__") and target in MODULES
           and _package(target) != _package(m)]
    assert bad == []


def test_config_and_registry_stay_at_the_bottom() -> None:
    assert {t for t in _graph()["hf_prune.registry"]} == set()
    families = ("hf_prune.training", "hf_prune.structure", "hf_prune.oneshot", "hf_prune.methods")
    assert [t for t in _graph()["hf_prune.config"] if t.startswith(families)] == []
    core = [m for m in MODULES if m.startswith("hf_prune.core")]
    assert [(m, t) for m in core for t in _graph()[m] if t.startswith(families)] == []
