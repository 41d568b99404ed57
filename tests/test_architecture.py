"""The package's import direction, read from the source (every ``import``, also inside functions):

    cli  →  jobs  →  libraries (ingest, store, datasets, phantom, training, metrics)  →  nets  →  modules

with ``config``, ``errors``, ``fileio``, ``locks``, ``runtime`` and the lazy top-level ``dagan_gn`` at the bottom, importable
by all. No module imports a higher layer; the libraries may import each other, but the package graph has no cycle.
Also: ``import dagan_gn`` does not import torch, and its public names resolve lazily (docs/architecture.md).
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dagan_gn"

#: Layer of each top-level part of the package (higher imports lower, never the reverse).
LAYERS = {
    "cli": 5,
    "jobs": 4,
    "ingest": 3, "store": 3, "datasets": 3, "phantom": 3, "training": 3, "metrics": 3,
    "nets": 2,
    "modules": 1,
    "config": 0, "errors": 0, "fileio": 0, "locks": 0, "runtime": 0, "workers": 0, "": 0,  # "": the package root (dagan_gn/__init__.py)
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(path: Path, *, module_level_only: bool = False) -> list[tuple[str, list[str]]]:
    """``(target module, imported names)`` of every ``dagan_gn`` import statement of a file that runs (never those
    under ``if TYPE_CHECKING:``); ``module_level_only``: also not those inside functions (what runs at import time).
    ``import a.b`` gives ``("a.b", [])``; relative imports are resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.split(".")[0] == "dagan_gn")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "dagan_gn":
                found.append((target, [a.name for a in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _imports(path: Path) -> set[str]:
    """Every ``dagan_gn...`` module a file imports when it runs (``if TYPE_CHECKING:`` blocks never run)."""
    found: set[str] = set()
    for target, names in _import_statements(path):
        found.add(target)
        found.update(f"{target}.{name}" for name in names)  # `from dagan_gn import jobs`
    return found


def _part(module: str) -> str | None:
    """The top-level part (``jobs``, ``config``, ``""`` for the root) of a real module, None if there is none."""
    parts = module.split(".")[1:]
    if not parts:
        return ""
    if (PACKAGE / parts[0]).is_dir() or (PACKAGE / f"{parts[0]}.py").is_file():
        return parts[0]
    return None  # a name imported from the root, e.g. `from dagan_gn import __version__`


@functools.lru_cache(maxsize=None)
def _graph() -> dict[str, dict[str, str]]:
    """Part → {part it imports (itself excluded): one module-level example "a.b imports c.d"}."""
    edges: dict[str, dict[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        src = _part(module)
        for target in sorted(_imports(path)):
            dst = _part(target)
            if dst is not None and dst != src:
                edges.setdefault(src, {}).setdefault(dst, f"{module} imports {target}")
    return edges


def test_every_part_has_a_layer():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS (and to docs/architecture.md)"


def test_no_module_imports_a_higher_layer():
    upward = sorted(example for src, dsts in _graph().items() for dst, example in dsts.items()
                    if LAYERS[dst] > LAYERS[src])
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_package_graph_has_no_cycle():
    graph = _graph()
    cycle = _find_cycle({node: set(dsts) for node, dsts in graph.items()})
    if cycle:
        examples = [graph[a][b] for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle " + " → ".join(cycle) + ": " + "; ".join(examples))


def test_the_analysis_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a function-level import and a relative import are both found."""
    imports = _imports(PACKAGE / "jobs" / "cifar10_study.py")
    assert "dagan_gn.jobs.train" in imports  # imported inside run_cell
    assert "dagan_gn.nets.cifar_dcgan" in _imports(PACKAGE / "nets" / "__init__.py")  # `from .cifar_dcgan import`
    assert "dagan_gn.training.trainer" not in _imports(PACKAGE / "training" / "handlers.py")  # TYPE_CHECKING only


def _run(code: str) -> str:
    root = PACKAGE.parent
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_import_dagan_gn_is_light_and_the_public_api_is_lazy():
    out = _run(
        "import sys, dagan_gn\n"
        "print('torch' in sys.modules, 'dagan_gn.jobs' in sys.modules)\n"
        "print(sorted(set(dagan_gn.__all__) - set(dir(dagan_gn))))\n"
        "print(dagan_gn.DaganError.__module__, dagan_gn.load_config.__module__, 'torch' in sys.modules)\n"
    )
    assert out.splitlines() == [
        "False False",  # nothing heavy at import time
        "[]",  # every public name is listed by dir()
        "dagan_gn.errors dagan_gn.config False",  # a name loads its own module only
    ]


def test_every_public_name_resolves():
    import dagan_gn

    for name in dagan_gn.__all__:
        assert getattr(dagan_gn, name) is not None, name
    assert dagan_gn.train.__module__ == "dagan_gn.jobs.train"
    assert dagan_gn.PatchDataset.__module__ == "dagan_gn.datasets.patches"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        dagan_gn.nope  # noqa: B018
    assert (PACKAGE / "py.typed").is_file()


# --------------------------------------------------------------------------------------------- inside a package


def _module_level_imports(path: Path) -> set[str]:
    """The ``dagan_gn`` modules a file imports while it is being imported: module level (also in ``try``/``if`` and
    class bodies), not inside functions, not under ``if TYPE_CHECKING:``. Names imported from a module are dropped;
    a name that is itself a module (``from dagan_gn.training import losses``) is kept."""
    return _resolved_imports(path, module_level_only=True)


def _resolved_imports(path: Path, *, module_level_only: bool) -> set[str]:
    """As :func:`_module_level_imports`; with ``module_level_only=False`` also the imports inside functions."""
    found: set[str] = set()
    for target, names in _import_statements(path, module_level_only=module_level_only):
        if not names:
            found.add(target)
            continue
        # `from pkg import submodule` needs only the submodule (pkg is always initialised first); `from pkg import
        # name` needs pkg itself to have run far enough to define the name.
        submodules = {f"{target}.{name}" for name in names} & set(_MODULES)
        found.update(submodules)
        if len(submodules) < len(names):
            found.add(target)
    return {m for m in found if m in _MODULES}


_MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path + [node, nxt]
                return cycle[cycle.index(nxt):]
            if nxt not in state:
                cycle = walk(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node, [])
            if cycle:
                return cycle
    return None


def test_no_runtime_import_cycle_inside_a_package():
    """Module-level imports between modules of one part (e.g. ``training.trainer`` ↔ ``training.checkpoint``) form no
    cycle: each module of a package can be imported first. (Function-level imports run later and are allowed.)"""
    graph: dict[str, set[str]] = {}
    for module, path in _MODULES.items():
        part = _part(module)
        graph[module] = {t for t in _module_level_imports(path) if t != module and _part(t) == part}
    cycle = _find_cycle(graph)
    assert cycle is None, "module-level import cycle inside a package: " + " → ".join(cycle)


def test_no_import_cycle_inside_a_package_even_through_function_level_imports():
    """Every import that runs counts, also inside functions: a function-level import that closes a circle
    (``report`` → ``report_privacy`` inside a function, ``report_privacy`` → ``report`` at the top) still ties two
    modules into one that can be neither read nor moved alone. Shared pieces go to a third module both import."""
    graph: dict[str, set[str]] = {}
    for module, path in _MODULES.items():
        part = _part(module)
        graph[module] = {t for t in _resolved_imports(path, module_level_only=False)
                         if t != module and _part(t) == part}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle inside a package (function-level imports included): " + " → ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    imports = _module_level_imports(PACKAGE / "jobs" / "cifar10_study.py")
    assert "dagan_gn.jobs.train" not in imports  # imported inside run_cell: not at import time


#: Lines a module may have before it must say why it is longer.
MAX_LINES = 500
REASON = "Longer than 500 lines because"


def test_no_module_is_long_without_a_reason():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        text = path.read_text()
        n = text.count("\n")
        if n <= MAX_LINES:
            continue
        if REASON not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{rel}: {n} lines")
    assert not too_long, (f"modules over {MAX_LINES} lines: split them by job, or say why at the top of the module "
                          f"docstring ('{REASON} ...'):\n" + "\n".join(too_long))


#: Lines a function of a job (``dagan_gn/jobs/``) may span, ``def`` to its last line (docstring included): a job
#: reads plan → run → report, and the steps live in helpers or in the libraries.
MAX_JOB_FUNCTION_LINES = 80


def _job_function_lengths() -> dict[str, int]:
    """``"dagan_gn/jobs/x.py::name"`` (nested functions as ``outer.inner``) → lines from ``def`` to ``end_lineno``."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, rel: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                lengths[f"{rel}::{name}"] = child.end_lineno - child.lineno + 1
                visit(child, rel, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, rel, f"{prefix}{child.name}.")
            else:
                visit(child, rel, prefix)

    for path in sorted((PACKAGE / "jobs").rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        visit(ast.parse(path.read_text(), filename=str(path)), rel, "")
    return lengths


def test_no_job_function_is_longer_than_80_lines():
    too_long = sorted(f"{name}: {n} lines" for name, n in _job_function_lengths().items()
                      if n > MAX_JOB_FUNCTION_LINES)
    assert not too_long, (f"functions in dagan_gn/jobs/ over {MAX_JOB_FUNCTION_LINES} lines: move the steps into "
                          "helpers or into the libraries:\n" + "\n".join(too_long))
