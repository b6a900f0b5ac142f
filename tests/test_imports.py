"""The import graph of ``peerlm/``: no cycle, and no module imports one of a higher layer.

Every import counts, also one inside a function (a lazy import is still a dependency). Layers, low to
high: the base (file I/O, config I/O, the data error), the library (layers, kernels, models,
optimizer, FLOPs, parallel building blocks, data, argument types, the transformers classes),
persistence (checkpoints, the run directory, the transformers export), runs (run config, training,
evaluation, generation, the parallel runtime), drivers (the study, the demo), and the command line.
A new module must be placed in ``LAYERS``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peerlm"

# prefix -> layer; the longest matching prefix wins
LAYERS = {
    "peerlm.fileio": 0, "peerlm.configio": 0, "peerlm.data.errors": 0,
    "peerlm": 1, "peerlm.data": 1, "peerlm.kernels": 1, "peerlm.parallel": 1, "peerlm.hf": 1,
    "peerlm.checkpoint": 2, "peerlm.rundir": 2, "peerlm.hf.export": 2,
    "peerlm.runconfig": 3, "peerlm.train": 3, "peerlm.evaluate": 3, "peerlm.generate": 3,
    "peerlm.parallel.runtime": 3, "peerlm.parallel.launch": 3,
    "peerlm.continual": 1, "peerlm.continual.finetune": 4, "peerlm.continual.study": 4,
    "peerlm.continual.study_report": 4, "peerlm.continual.cli": 5,
    "peerlm.study": 4, "peerlm.demo": 4, "peerlm.hf.training": 4, "peerlm.hf.retrofit": 4,
    "peerlm.cli": 5, "peerlm.trainargs": 5, "peerlm.__main__": 5, "peerlm.data.cli": 5, "peerlm.study.cli": 5,
}
NAMES = ("base", "library", "persistence", "runs", "drivers", "command line")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` stands for: itself, or the package or module that defines it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The peerlm modules ``module`` imports. ``from P import x`` counts as an import of submodule
    ``P.x`` where there is one, else of ``P``; a module's import of a package it lies in (its own
    ``__init__`` re-exports) is not an edge: that is how a package is put together."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names]
            names = [n if n in modules else base for n in subs]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "peerlm":
                target = _resolve(n, modules)
                if target and target != module and not module.startswith(target + "."):
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _layer(module: str) -> int:
    key = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[key]


def test_every_module_has_a_layer():
    for m in _graph():
        assert any(m == p or m.startswith(p + ".") for p in LAYERS), m


def test_no_import_from_a_lower_layer_up():
    upward = [f"{m} ({NAMES[_layer(m)]}) imports {t} ({NAMES[_layer(t)]})"
              for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The parser resolves the import forms the package uses (absolute, relative, from-package)."""
    modules = {"peerlm": tmp_path / "__init__.py", "peerlm.a": tmp_path / "a.py",
               "peerlm.sub": tmp_path / "sub" / "__init__.py", "peerlm.sub.b": tmp_path / "sub" / "b.py"}
    (tmp_path / "sub").mkdir()
    modules["peerlm"].write_text("")
    modules["peerlm.a"].write_text("def f():\n    from peerlm.sub import b\n")
    modules["peerlm.sub"].write_text("from .b import g\n")
    modules["peerlm.sub.b"].write_text("from peerlm import a\nfrom peerlm.sub import g\nimport peerlm.fileio\n")
    assert _imports("peerlm.a", modules["peerlm.a"], modules) == {"peerlm.sub.b"}
    assert _imports("peerlm.sub", modules["peerlm.sub"], modules) == {"peerlm.sub.b"}
    assert _imports("peerlm.sub.b", modules["peerlm.sub.b"], modules) == {"peerlm.a"}
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    assert _cycles(graph) == [["peerlm.a", "peerlm.sub.b", "peerlm.a"]]
    assert _layer("peerlm.checkpoint.local") == 2 and _layer("peerlm.study.cli") == 5

