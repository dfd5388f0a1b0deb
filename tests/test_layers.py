"""The package's imports flow one way and have no cycles; no import hides inside a function.

Layers, lowest first: ``errors`` -> ``io`` (files) -> ``nn``, ``distributions``
and ``data`` -> ``models`` and ``guides`` -> ``inference`` -> ``app`` -> ``cli``.
A module imports only from its own layer's package or from lower layers
(``models`` and ``guides`` are siblings: neither imports the other), and the
graph of module-level imports has no cycle. Inside ``inference`` the same holds
for its parts (``INFERENCE``): the shared pieces, the fitted record, then
training, the gaps and MCMC (three parts that import nothing of each other), the
fitted result with its analyses, and on top ``fit`` and what uses it; the package
itself re-exports lazily, so training and the record load without the analyses.
Inside functions, only optional
heavy third-party packages may be imported (plotting, tables, ArviZ), and the
command line's single deferred import of :mod:`ppl_vae.app.commands`, which
loads torch inside its Ctrl-C handler.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_vae"

LAYERS = {
    "ppl_vae.errors": 0,
    "ppl_vae.io": 1,
    "ppl_vae.progress": 1,
    "ppl_vae.nn": 2,
    "ppl_vae.distributions": 2,
    "ppl_vae.data": 2,
    "ppl_vae.models": 3,
    "ppl_vae.guides": 3,
    "ppl_vae.inference": 4,
    "ppl_vae.app": 5,
    "ppl_vae.cli": 6,
    "ppl_vae": 7,  # the package __init__: lazy re-exports only
}

#: the parts of ``ppl_vae.inference`` (module -> (rank, part)), lowest first: a module imports only from its own part
#: or a lower rank, so the parts of one rank (training, gaps, MCMC) import nothing of each other
INFERENCE = {
    **dict.fromkeys(
        (
            "plates",
            "philox",
            "random",
            "dispatch",
            "validation",
            "traces",
            "latent",
            "params",
            "batches",
            "schedules",
            "compiled",
            "kernel",
            "azcompat",
            "distributed",
            "elbo",
        ),
        (0, "shared"),
    ),
    "fitted": (1, "record"),
    **dict.fromkeys(("estimators", "step", "loop", "checkpoints", "watch"), (2, "training")),
    "gaps": (2, "gaps"),
    "mcmc": (2, "mcmc"),
    "result": (3, "result"),
    **dict.fromkeys(("svi", "calibration", "gradients", "pretrain"), (4, "top")),
    "": (5, "package"),  # ppl_vae/inference/__init__.py: lazy re-exports
}

#: third-party packages a function may import lazily (heavy, or optional for a code path)
LAZY_OK = {
    "matplotlib",
    "seaborn",
    "pandas",
    "arviz",
    "arviz_stats",
    "xarray",
    "sklearn",
    "scipy",
    "torchvision",
    "lightning",
    "pickletools",
    "pickle",
    "functools",
    "itertools",
    "logging",
}
#: internal imports allowed inside a function: (importing module, imported module)
DEFERRED_OK = {("ppl_vae.cli", "ppl_vae.app.commands")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list[str]:
    """The ppl_vae modules an ``ImportFrom`` names (``from . import x`` may name submodules)."""
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("ppl_vae"):
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _imports(module: str, path: Path) -> tuple[set[str], list[tuple[str, int]]]:
    """(module-level ppl_vae imports, [(name, line)] of imports inside functions)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    inner: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom):
                    names = _resolve(module, path, sub) or [sub.module or ""]
                    inner += [(n, sub.lineno) for n in names]
                elif isinstance(sub, ast.Import):
                    inner += [(a.name, sub.lineno) for a in sub.names]
    for node in tree.body:
        stmts = [node]
        if isinstance(
            node, ast.If
        ):  # TYPE_CHECKING blocks count: a cycle there is a cycle in the design
            stmts = node.body
        if isinstance(node, ast.Try):
            stmts = node.body
        for st in stmts:
            if isinstance(st, ast.ImportFrom):
                top.update(_resolve(module, path, st))
            elif isinstance(st, ast.Import):
                top.update(a.name for a in st.names if a.name.startswith("ppl_vae"))
    return top, inner


def _layer(module: str) -> tuple[int, str]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix], prefix
    raise AssertionError(f"{module} is in no layer")


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module):
    rank, package = _layer(module)
    for target in sorted(GRAPH[module][0]):
        t_rank, t_package = _layer(target)
        assert t_rank < rank or t_package == package, (
            f"{module} (layer {rank}) imports {target} (layer {t_rank})"
        )


def _part(module: str) -> tuple[int, str]:
    name = module.removeprefix("ppl_vae.inference").removeprefix(".")
    for key in sorted(INFERENCE, key=len, reverse=True):
        if name == key or (key and name.startswith(key + ".")):
            return INFERENCE[key]
    raise AssertionError(f"{module} is in no part of INFERENCE: add it to the table")


INSIDE = sorted(m for m in MODULES if _layer(m)[1] == "ppl_vae.inference")
INSIDE_SET = set(INSIDE)


def _reached(module: str) -> set[str]:
    """Every package module ``module`` imports at module level, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for t in GRAPH[todo.pop()][0]:
            if t in MODULES and t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


@pytest.mark.parametrize("module", INSIDE)
def test_the_parts_of_inference_import_one_way(module):
    rank, part = _part(module)
    for target in sorted(t for t in GRAPH[module][0] if t in INSIDE):
        t_rank, t_part = _part(target)
        assert t_rank < rank or t_part == part, (
            f"{module} ({part}, rank {rank}) imports {target} ({t_part}, rank {t_rank})"
        )


def test_the_parts_of_inference_are_the_ones_described():
    """The shared pieces sit below the rest; the record below the analyses; gaps and MCMC know neither training nor each other."""
    parts = {m: _part(m) for m in INSIDE}

    def named(part: str) -> set[str]:
        return {m for m, (_, p) in parts.items() if p == part}

    assert {"ppl_vae.inference.kernel", "ppl_vae.inference.azcompat"} <= named("shared")
    assert {"ppl_vae.inference.svi", "ppl_vae.inference.step"} <= named("top") | named("training")
    for part, others in (
        ("shared", ("record", "training", "gaps", "mcmc", "result", "top")),
        ("record", ("training", "gaps", "mcmc", "result", "top")),
        ("training", ("gaps", "mcmc", "result", "top")),
        ("gaps", ("training", "mcmc", "result", "top")),
        ("mcmc", ("training", "gaps", "result", "top")),
    ):
        for module in named(part):
            reached = _reached(module) & INSIDE_SET
            assert not {t for t in reached if parts[t][1] in others}, (module, part)


def test_training_and_the_fitted_record_load_without_the_analyses():
    """``import ppl_vae.inference.loop`` (the package's ``__init__`` runs first) loads no module of the gaps or of MCMC."""
    code = (
        "import sys, ppl_vae.inference.loop, ppl_vae.inference.fitted\n"
        "print(sorted(m for m in sys.modules if m.startswith(('ppl_vae.inference.gaps', 'ppl_vae.inference.mcmc'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_imports_hide_inside_functions(module):
    for name, line in GRAPH[module][1]:
        if name.startswith("ppl_vae"):
            assert (module, name) in DEFERRED_OK, (
                f"{module}:{line} imports {name} inside a function"
            )
        else:
            assert name.split(".")[0] in LAZY_OK, (
                f"{module}:{line} imports {name} inside a function"
            )


def test_the_module_graph_has_no_cycle():
    edges = {m: {t for t in GRAPH[m][0] if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_graph_was_read():
    """The walk found the layers it checks (a refactor that moved the package would otherwise pass vacuously)."""
    assert {
        "ppl_vae.cli",
        "ppl_vae.app.commands.fit",
        "ppl_vae.inference.svi",
        "ppl_vae.models.vae",
    } <= set(MODULES)
    assert "ppl_vae.inference.svi" in GRAPH["ppl_vae.app.commands.fit"][0] or any(
        t.startswith("ppl_vae.inference") for t in GRAPH["ppl_vae.app.commands.fit"][0]
    )


TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    "path", sorted(TESTS.rglob("test_*.py")), ids=lambda p: str(p.relative_to(TESTS))
)
def test_no_test_module_imports_another(path):
    """Shared helpers live in ``tests/conftest.py``; a test module imports no other test module."""
    tree = ast.parse(path.read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [
        m for m in names if m.split(".")[-1].startswith("test_") or m.startswith("tests")
    ], names


def test_tests_mirror_the_package():
    """Every test folder names a package folder (``tests/inference/gaps`` tests ``ppl_vae/inference/gaps``)."""
    folders = {p.parent.relative_to(TESTS) for p in TESTS.rglob("test_*.py")} - {Path(".")}
    assert folders, "no test folders found"
    assert [f for f in folders if not (PACKAGE / f).is_dir()] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_private_names_stay_in_their_module(module):
    """``from x import _name`` between package modules would make a private name part of two modules."""
    tree = ast.parse(MODULES[module].read_text())
    private = [
        f"{n.module or '.'}.{a.name}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").startswith("ppl_vae"))
        for a in n.names
        if a.name.startswith("_") and a.name != "__future__"
    ]
    assert not private, private


def test_the_top_level_holds_the_names_the_guide_uses_and_moved_names_warn():
    """``from ppl_vae import X`` for the README's and the guide's names; the names moved to ``ppl_vae.inference`` still import, with a
    DeprecationWarning naming where they live now."""
    import warnings

    import ppl_vae
    import ppl_vae.inference

    guide = {
        name
        for page in [PACKAGE.parent / "README.md", *(PACKAGE.parent / "docs").glob("*.md")]
        for line in re.findall(r"from ppl_vae import ([^\n]+)", page.read_text())
        for name in re.findall(r"\w+", line)
    }
    assert guide and guide <= set(ppl_vae.__all__), guide - set(ppl_vae.__all__)
    for name in ("importance_bounds", "Estimate"):
        assert name not in ppl_vae.__all__
        with pytest.warns(
            DeprecationWarning, match=f"ppl_vae.{name} moved: import it from ppl_vae.inference"
        ):
            value = getattr(ppl_vae, name)
        assert value is getattr(ppl_vae.inference, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ppl_vae.fit is ppl_vae.inference.fit


def test_library_tests_stay_below_the_application_layer():
    """A test outside ``tests/app`` imports neither ``ppl_vae.app`` nor ``ppl_vae.cli`` (at module level, inside a function, or
    by ``importlib.import_module``): a library test builds its model, guide and data with the library, so it holds when
    the app changes; the tests of the app, the command line and run folders live in ``tests/app``, with their fixtures in
    ``tests/app/conftest.py``. The scripts of ``benchmarks/`` are exempt: they are not tests but users of the whole
    package, the command line's run folders included, as ``examples/`` are."""
    app = ("ppl_vae.app", "ppl_vae.cli")

    def in_app(name: str) -> bool:
        return any(name == a or name.startswith(a + ".") for a in app)

    def app_imports(path: Path) -> list[str]:
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [a.name for a in node.names if in_app(a.name)]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
                found += [n for n in [node.module, *names] if in_app(n)][:1]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and in_app(node.args[0].value)
            ):
                found.append(node.args[0].value)
        return [f"{path.relative_to(TESTS.parent)}:{n}" for n in found]

    files = sorted(TESTS.rglob("*.py"))
    library = [p for p in files if (TESTS / "app") not in p.parents]
    folders = {p.relative_to(TESTS).parts[0] for p in library}
    assert {"conftest.py", "data", "guides", "models", "inference"} <= folders, folders
    assert [hit for p in library for hit in app_imports(p)] == []
    # the check sees what it looks for: the tests of the app do import it
    assert app_imports(TESTS / "app" / "conftest.py") == ["tests/app/conftest.py:ppl_vae.cli"]


def test_inference_imports_each_name_on_first_use_and_moved_names_warn():
    """Every name of ``ppl_vae.inference.__all__`` resolves (star import included); the ArviZ module and the record
    keep their old paths for one release, with a DeprecationWarning naming where they live now."""
    import ppl_vae.inference
    from ppl_vae.inference import azcompat, fitted, result

    namespace: dict[str, object] = {}
    exec("from ppl_vae.inference import *", namespace)
    assert set(ppl_vae.inference.__all__) <= set(namespace)
    assert namespace["FitResult"] is result.FitResult and namespace["traces"].__module__.endswith(
        "traces"
    )
    assert callable(namespace["traces"])  # the function, not its module
    assert ppl_vae.FitResult is result.FitResult and issubclass(result.FitResult, fitted.FitRecord)
    assert {"posterior", "elbo", "iwae"} <= set(vars(result.FitResult))
    assert not {"posterior", "elbo", "iwae"} & set(dir(fitted.FitRecord))
    with pytest.warns(
        DeprecationWarning, match="fitted.FitResult moved: import it from ppl_vae.inference"
    ):
        assert fitted.FitResult is fitted.FitRecord
    from ppl_vae.inference.mcmc import azcompat as old

    with pytest.warns(
        DeprecationWarning, match="import pareto_khat from ppl_vae.inference.azcompat"
    ):
        assert old.pareto_khat is azcompat.pareto_khat
    with pytest.raises(AttributeError):
        ppl_vae.inference.no_such_name  # noqa: B018


def test_inference_reexports_every_name_of_the_gaps_and_of_mcmc():
    """The package's lazy table takes the names of :mod:`.gaps` and :mod:`.mcmc` from their ``__all__`` (read from source):
    each is listed in the package's ``__all__`` and is the subpackage's object."""
    import ppl_vae.inference
    from ppl_vae.inference import gaps, mcmc

    for sub in (gaps, mcmc):
        assert sub.__all__ and set(sub.__all__) <= set(ppl_vae.inference.__all__), sub.__name__
        for name in sub.__all__:
            assert getattr(ppl_vae.inference, name) is getattr(sub, name), name
