"""Static structure checks of the packages ``thermo_kfac`` and ``hw_models`` (read with ``ast``).

They enforce the module seams of docs/architecture.md: no module reaches into another module's
underscore names, no import cycle (module-level imports, ``if TYPE_CHECKING:`` ones included),
modules stay small, ``hw_models`` knows nothing of ``thermo_kfac``, and the core of ``thermo_kfac``
never imports its distributed extension.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("thermo_kfac", "hw_models")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """Absolute dotted name of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_packages_found() -> None:
    # guards the checks below against passing vacuously on a wrong root
    assert "hw_models.langevin" in MODULES and "thermo_kfac.solvers.base" in MODULES


def test_no_private_imports_across_modules() -> None:
    offenders = []
    for module, path in MODULES.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                if not _ours(source) or source == module:
                    continue
                for alias in node.names:
                    if _is_private(alias.name):
                        offenders.append(f"{_rel(path)}:{node.lineno}: from {source} import "
                                         f"{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    last = alias.name.split(".")[-1]
                    if _ours(alias.name) and _is_private(last) and alias.name != module:
                        offenders.append(f"{_rel(path)}:{node.lineno}: import {alias.name}")
    assert not offenders, ("modules import another module's underscore names (make them public "
                           "or add a public accessor):\n  " + "\n  ".join(offenders))


def _own_names(tree: ast.Module) -> set[str]:
    """Attribute names a module defines itself: functions and classes, class attributes (also
    dataclass fields), and ``self.x``/``cls.x`` assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else \
                    [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
            names.add(node.attr)
    return names


def _private_attribute_reads(tree: ast.Module) -> list[tuple[int, str]]:
    """``obj._attr`` (and ``getattr(obj, "_attr")``) where ``obj`` is not ``self``/``cls``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"}:
                continue
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in {"getattr", "setattr", "hasattr"} and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _is_private(node.args[1].value):
            if isinstance(node.args[0], ast.Name) and node.args[0].id in {"self", "cls"}:
                continue
            found.append((node.lineno, node.args[1].value))
    return found


def test_no_private_attribute_access_across_modules() -> None:
    # An underscore attribute of another object is fine only if this module defines it (its own
    # classes' state); anything else reaches into another module's (or a library's) internals.
    offenders = []
    for path in MODULES.values():
        tree = _tree(path)
        own = _own_names(tree)
        for line, attr in sorted(_private_attribute_reads(tree)):
            if attr not in own:
                offenders.append(f"{_rel(path)}:{line}: .{attr}")
    assert not offenders, ("modules access underscore attributes they do not define (another "
                           "module's or library's internals; give the owner a public method):\n  "
                           + "\n  ".join(offenders))


def test_module_size() -> None:
    too_long = []
    for path in MODULES.values():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_long.append(f"{_rel(path)}: {lines} lines")
    assert not too_long, (f"modules over {MAX_LINES} lines (split them by job):\n  "
                          + "\n  ".join(too_long))


def _module_edges(module: str, path: Path, tree: ast.Module | None = None) -> set[str]:
    """Our modules that ``module`` depends on by its module-level imports: including ``if``/``try``
    /``with`` blocks at module level and ``if TYPE_CHECKING:`` (a type-only import is still a
    dependency of the design), but not imports inside functions."""
    edges: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _ours(alias.name):
                        edges.add(_known(alias.name))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, path, node)
                if not _ours(source):
                    continue
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{source}.{alias.name}"
                    edges.add(sub if sub in MODULES else _known(source))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit((tree or _tree(path)).body)
    edges.discard(module)
    return edges


def _known(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles() -> None:
    # Only explicit imports count: a package's __init__ importing its submodules (re-exports) is
    # the normal direction, and the implicit submodule -> parent-package import is not a cycle.
    # Type-only imports count too: two modules that name each other's types are one design.
    graph = {m: {e for e in _module_edges(m, p) if e} for m, p in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, ("import cycles among our modules (``if TYPE_CHECKING:`` imports included; "
                        "move the shared piece down, or type against a protocol of the lower "
                        "module):\n  " + "\n  ".join(" <-> ".join(c) for c in cycles))


#: Packages and modules of thermo_kfac outside its core: the distributed extension, the experiments
#: and the command line. Everything else is the core, which never imports the distributed extension
#: (a distribution strategy is built outside and passed in).
NOT_CORE = ("thermo_kfac.distributed", "thermo_kfac.experiments", "thermo_kfac.cli")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imported_names(module: str, path: Path, tree: ast.Module) -> list[tuple[int, str]]:
    """Every module named by an import anywhere in ``tree`` (functions, ``TYPE_CHECKING`` too);
    ``from pkg import name`` also names ``pkg.name``, which may be a subpackage."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            found += [(node.lineno, source)] + [(node.lineno, f"{source}.{a.name}") for a in node.names]
    return found


def _core_offenders(module: str, path: Path, tree: ast.Module) -> list[str]:
    if not _within(module, "thermo_kfac") or any(_within(module, p) for p in NOT_CORE):
        return []
    return [f"{_rel(path)}:{line}: {name}" for line, name in _imported_names(module, path, tree)
            if _within(name, "thermo_kfac.distributed")]


def test_core_does_not_import_distributed() -> None:
    offenders = [o for m, p in MODULES.items() for o in _core_offenders(m, p, _tree(p))]
    assert not offenders, ("core modules import thermo_kfac.distributed (pass a distribution strategy "
                           "in instead; only the extension, experiments and cli may import it):\n  "
                           + "\n  ".join(offenders))


def test_hw_models_does_not_import_thermo_kfac() -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("hw_models"):
            continue
        for node in ast.walk(_tree(path)):  # anywhere, also inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [_resolve(module, path, node)]
            offenders += [f"{_rel(path)}:{node.lineno}: {n}" for n in names
                          if n.split(".")[0] == "thermo_kfac"]
    assert not offenders, ("hw_models must not depend on thermo_kfac:\n  " + "\n  ".join(offenders))


@pytest.mark.parametrize("source, expected", [
    ("from thermo_kfac.solvers.base import _REGISTRY\n", 1),
    ("from thermo_kfac.solvers.base import KFACSolver\n", 0),
    ("from torch.nn.functional import _pad\n", 0),
])
def test_private_import_detector(source: str, expected: int) -> None:
    # the detector itself: it flags our underscore names and nothing else
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ImportFrom)
    hits = [a for a in node.names if _ours(node.module or "") and _is_private(a.name)]
    assert len(hits) == expected


def test_attribute_detector() -> None:
    tree = ast.parse(
        "_GLOBAL = 1\n"
        "class A:\n"
        "    _field: int = 0\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def f(self, other):\n"
        "        return (other._mine + other._theirs + self._x + getattr(other, '_hidden')\n"
        "                + other._field + other._GLOBAL)\n")
    own = _own_names(tree)
    bad = sorted(attr for _, attr in _private_attribute_reads(tree) if attr not in own)
    assert bad == ["_GLOBAL", "_hidden", "_theirs"]


def test_cycle_detector() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_edges() -> None:
    # the edge builder sees type-only imports, so a protocol-free back-reference is a cycle
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from thermo_kfac.preconditioner import KFACPreconditioner\n"
                     "def f():\n    from thermo_kfac import policy\n")
    path = ROOT / "thermo_kfac" / "layers.py"
    assert _module_edges("thermo_kfac.layers", path, tree) == {"thermo_kfac.preconditioner"}


@pytest.mark.parametrize("module, source, offends", [
    ("thermo_kfac.preconditioner", "from thermo_kfac.distributed import DistributedKFAC\n", True),
    ("thermo_kfac.optimizer", "def f():\n    from thermo_kfac import distributed as dist\n", True),
    ("thermo_kfac.layers", "if typing.TYPE_CHECKING:\n    import thermo_kfac.distributed.kfac\n", True),
    ("thermo_kfac.quadratic", "from thermo_kfac.process_group import world_size\n", False),
    ("thermo_kfac.experiments.launch", "from thermo_kfac.distributed import DistributedConfig\n", False),
    ("thermo_kfac.distributed.kfac", "from thermo_kfac.distributed.config import DistributedConfig\n",
     False),
])
def test_core_rule_detector(module: str, source: str, offends: bool) -> None:
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    assert bool(_core_offenders(module, path, ast.parse(source))) == offends
