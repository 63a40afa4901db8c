"""The layout's rules, checked: no import runs upward, front doors do not import each other, Accelerate needs no Lightning."""

from __future__ import annotations

import ast
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
    "lightning": set(),
    "fabric": set(),
    "accelerate": set(),
    "commands": {"lightning"},  # the fit/validate/... subcommands are the LightningCLI
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
