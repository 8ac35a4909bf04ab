"""The package's layering stays true: cli -> tasks -> training -> core -> kernels.

Every module's imports (top-level and inside functions) are read from its source; a module may
import from its own layer or a lower one, never a higher one. Core is every module directly in
jaxgpt/. Also: importing jaxgpt runs no JAX and no module of the package beyond its __init__.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxgpt"
LAYERS = {"kernels": 0, "core": 1, "training": 2, "tasks": 3, "cli": 4}


def layer_of(module: str) -> str:
    """'jaxgpt.training.step' -> 'training'; 'jaxgpt.model' -> 'core'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "core"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, module) for every jaxgpt module the file imports, resolving `from jaxgpt import x`
    to jaxgpt.x when x is a submodule."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jaxgpt"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "jaxgpt":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (root / Path(*sub.split("."))).with_suffix(".py").is_file() \
                    or (root / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_module else node.module))
    return out


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        if name == "jaxgpt":
            continue  # the public API re-exports from every layer, lazily
        mine = LAYERS[layer_of(name)]
        for line, target in imported_modules(path, package.parent):
            if target == "jaxgpt":
                continue
            if LAYERS[layer_of(target)] > mine:
                found.append(f"{path.relative_to(package.parent)}:{line}: {layer_of(name)} module "
                             f"{name} imports {layer_of(target)} module {target}")
    return found


def test_no_module_imports_a_higher_layer():
    assert violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    # The same check on a copy with one planted violation: it must be reported.
    fake = tmp_path / "jaxgpt"
    (fake / "kernels").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "training" / "__init__.py").write_text("")
    (fake / "training" / "step.py").write_text("")
    (fake / "kernels" / "__init__.py").write_text("")
    (fake / "kernels" / "dense.py").write_text("def f():\n    from jaxgpt.training import step\n")
    (fake / "model.py").write_text("import jaxgpt.kernels.dense\n")
    found = violations(fake)
    assert len(found) == 1 and "kernels module jaxgpt.kernels.dense imports training" in found[0]


@pytest.mark.parametrize("name", ["kernels", "core", "training", "tasks", "cli"])
def test_every_layer_has_modules(name):
    mods = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert name in mods


def test_import_jaxgpt_loads_nothing_heavy():
    code = ("import sys, jaxgpt; "
            "print(sorted(m for m in sys.modules if m.startswith(('jax', 'flax', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "['jaxgpt']"
