"""The layout's rules, checked.

No import runs upward, front doors do not import each other, Accelerate needs no Lightning, every
Lightning or Fabric module imports Lightning, foreign ``_private`` names are reached only in the
fences, and ``core/`` has no import circle (lazy imports included).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_paged"
MAX_LINES = 400

# What each layer may import from the package (besides itself and core, which everything may use).
LAYERS = {
    "core": set(),
    "testing": set(),
    "compat": set(),  # the front-door fence (Lightning, jsonargparse, OmegaConf); core never imports it
    "lightning": {"compat"},
    "fabric": {"compat"},
    "accelerate": set(),
    "commands": {"lightning", "compat"},  # the fit/validate/... subcommands are the LightningCLI
    "__init__": {"lightning", "fabric", "accelerate", "commands", "testing"},
    "__main__": {"commands"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_imports() -> list[tuple[str, str, int]]:
    """Every ``(importer, imported, line)`` between modules of the package, lazy imports included."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if rel.name == "__init__" and module == "lightning_paged":
            module = "lightning_paged.__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            edges += [(module, name, node.lineno) for name in names if name.startswith("lightning_paged.")]
    return edges


def test_no_import_runs_upward_and_front_doors_do_not_import_each_other():
    wrong = []
    for importer, imported, line in package_imports():
        source, target = layer(importer), layer(imported)
        if target in (source, "core"):
            continue
        if target not in LAYERS[source]:
            wrong.append(f"{importer}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_framework():
    frameworks = ("lightning", "accelerate", "jsonargparse")
    found = []
    for path in sorted((PACKAGE / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in frameworks]
    assert not found, found


def test_accelerate_loads_no_lightning_module():
    # The package's __init__ re-exports the Lightning classes (and registers the strategies), so
    # load lightning_paged.accelerate without it, with every Lightning import made to fail.
    code = (
        "import sys, types\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['lightning.pytorch'] = None\n"
        "sys.modules['lightning.fabric'] = None\n"
        f"package = types.ModuleType('lightning_paged'); package.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['lightning_paged'] = package\n"
        "import lightning_paged.accelerate\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' and sys.modules[m] is not None))\n"
        "print(sorted(m for m in sys.modules if m.startswith('lightning_paged.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lightning_modules, package_modules = run.stdout.strip().splitlines()
    assert lightning_modules == "[]"
    assert "lightning_paged.accelerate" in package_modules
    assert (
        "lightning_paged.lightning" not in package_modules and "lightning_paged.fabric" not in package_modules
    )


def _imports_of(script: Path, blocked: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The Lightning and package modules that importing ``script`` loads, ``blocked`` made to fail.

    The package's ``__init__`` (which registers the Lightning strategies) is left out, as an
    Accelerate or Fabric user's own code would reach the modules it imports.
    """
    code = (
        "import runpy, sys, types\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"package = types.ModuleType('lightning_paged'); package.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['lightning_paged'] = package\n"
        f"runpy.run_path({str(script)!r}, run_name='imported')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' and sys.modules[m] is not None))\n"
        "print(sorted(m for m in sys.modules if m.startswith('lightning_paged.')))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    lightning_modules, package_modules = run.stdout.strip().splitlines()
    return ast.literal_eval(lightning_modules), ast.literal_eval(package_modules)


def test_the_loop_examples_get_their_instruction_data_from_the_core():
    lightning_modules, package_modules = _imports_of(
        ROOT / "examples" / "accelerate_qlora.py", ("lightning", "lightning.pytorch", "lightning.fabric")
    )
    assert lightning_modules == []
    assert "lightning_paged.core.instructions" in package_modules
    _, package_modules = _imports_of(ROOT / "examples" / "fabric_qlora.py", ())
    assert "lightning_paged.core.instructions" in package_modules
    assert not any(m.startswith("lightning_paged.lightning") for m in package_modules)


def test_no_package_file_is_over_the_size_of_one_concept():
    long = {
        str(path.relative_to(ROOT)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


# --- Lightning's rooms hold Lightning -------------------------------------------------------------


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every absolute ``(module, line)`` a file imports, function-local imports included.

    ``from package import name`` yields ``package.name`` too, so importing a submodule by name counts.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def _only_reexports(tree: ast.Module) -> bool:
    """A docstring, imports and ``__all__``: a package's ``__init__`` with no code of its own."""
    return all(
        (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        or isinstance(n, ast.Import | ast.ImportFrom)
        or (isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["__all__"])
        for n in tree.body
    )


def test_every_lightning_and_fabric_module_imports_lightning():
    """A module there without Lightning in it is framework-free: it belongs in ``core/``.

    The Lightning fence (:mod:`lightning_paged.compat.lightning`) counts as Lightning; a package's
    ``__init__`` that only re-exports its modules' names has no code to move.
    """
    without = []
    for room in ("lightning", "fabric"):
        for path in sorted((PACKAGE / room).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if path.name == "__init__.py" and _only_reexports(tree):
                continue
            names = [name for name, _ in _imports(tree)]
            if not any(
                n.split(".")[0] == "lightning" or n.startswith("lightning_paged.compat.lightning")
                for n in names
            ):
                without.append(str(path.relative_to(ROOT)))
    assert not without, f"no Lightning import (move to core/): {without}"


# --- foreign internals only in the fences --------------------------------------------------------

FENCES = ("lightning_paged/core/compat/", "lightning_paged/compat/")
ACCESSORS = ("getattr", "setattr", "hasattr", "delattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _project_classes() -> set[str]:
    """Names of the classes the package defines: ``FakeCupti._Config`` is the project's own."""
    return {
        node.name
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }


def _own(base: ast.expr, classes: set[str]) -> bool:
    """``self``, ``cls``, ``super()`` or a class of the package: a private reached on it is not foreign."""
    if isinstance(base, ast.Name):
        return base.id in ("self", "cls") or base.id in classes
    return isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super"


def _private_reach(node: ast.AST) -> tuple[ast.expr, str] | None:
    """``(obj, "_name")`` for ``obj._name`` or ``getattr(obj, "_name", ...)`` (or set/has/delattr)."""
    if isinstance(node, ast.Attribute) and _private(node.attr):
        return node.value, node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ACCESSORS
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
    ):
        return node.args[0], node.args[1].value
    return None


def _foreign_private(node: ast.AST, classes: set[str]) -> bool:
    """``obj._name`` or ``getattr(obj, "_name", ...)`` with ``obj`` not the project's own."""
    reach = _private_reach(node)
    return reach is not None and not _own(reach[0], classes)


def foreign_private_access(path: Path, classes: set[str]) -> list[str]:
    """Each ``obj._name``, ``getattr(obj, "_name")`` and ``from lib import _name`` of a foreign object in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if _foreign_private(node, classes):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("lightning_paged") or node.module == "__future__":
                continue
            private_module = any(_private(part) for part in node.module.split("."))
            names = [a.name for a in node.names if _private(a.name)]
            if private_module or names:
                found.append(f"{node.lineno}: from {node.module} import {', '.join(names) or '...'}")
    return found


def test_foreign_private_names_are_reached_only_in_the_fences():
    """Outside ``core/compat/`` and ``compat/``, no ``_private`` attribute of another library's objects.

    A private reached on ``self``, ``cls`` or ``super()`` is the class's own or inherited; those a
    subclass inherits from Lightning are checked against the fence's list in the next test.
    """
    classes = _project_classes()
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if not rel.startswith(FENCES) and (hits := foreign_private_access(path, classes)):
            found[rel] = hits
    assert not found, found


def _self_privates(node: ast.ClassDef) -> set[str]:
    """Private names a class body defines, overrides or reads on ``self`` (``self._x``, ``getattr(self, "_x")``, ``super()._x``)."""
    names = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef) and _private(inner.name):
            names.add(inner.name)
        elif (reach := _private_reach(inner)) is not None and _own(reach[0], set()):
            names.add(reach[1])
    return names


def _foreign_declares(cls: type, name: str) -> type | None:
    """The first foreign class in ``cls``'s MRO that defines ``name`` or assigns ``self.<name>``."""
    for base in cls.__mro__:
        if base.__module__.startswith("lightning_paged") or base is object:
            continue
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            source = ""
        if name in vars(base) or re.search(rf"self\.{re.escape(name)}\b", source):
            return base
    return None


def test_private_members_inherited_from_lightning_are_declared_in_the_fence():
    from lightning_paged.compat.lightning import PRIVATE_MEMBERS

    declared = {(q.rpartition(".")[2], n) for q, members in PRIVATE_MEMBERS.items() for n in members}
    undeclared = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        module = importlib.import_module(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        for node in ast.walk(ast.parse(path.read_text())):
            cls = getattr(module, node.name, None) if isinstance(node, ast.ClassDef) else None
            if not inspect.isclass(cls):
                continue
            for name in sorted(_self_privates(node)):
                owner = _foreign_declares(cls, name)
                if owner is not None and not any((c.__name__, name) in declared for c in owner.__mro__):
                    undeclared.append(
                        f"{rel}: {node.name}.{name} (from {owner.__module__}.{owner.__qualname__})"
                    )
    assert not undeclared, undeclared


# --- no import circle in core/ --------------------------------------------------------------------


def core_import_graph() -> dict[str, set[str]]:
    """Module to the ``core`` modules it imports, at the top or inside a function."""
    modules = {}
    for path in (PACKAGE / "core").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name, _ in _imports(ast.parse(path.read_text())):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                targets.add(name)
        graph[module] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_lazy_circle():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_has_no_import_circle():
    assert import_circles(core_import_graph()) == []


def test_the_private_access_check_sees_each_form(tmp_path: Path):
    source = tmp_path / "sample.py"
    source.write_text(
        "from lightning.fabric.utilities.types import _PATH\n"
        "def f(trainer, self):\n"
        "    trainer._logger_connector\n"
        "    getattr(trainer.fit_loop, '_data_fetcher', None)\n"
        "    self._own\n"
        "    super()._check()\n"
        "    Mine._Inner\n"
    )
    found = foreign_private_access(source, {"Mine"})
    assert [f.split(":")[0] for f in found] == ["1", "3", "4"], found
