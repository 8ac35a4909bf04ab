"""The package keeps its order: imports run one way, with no cycle and no private name crossing
a module's border, and the public API imports without JAX.

Every import of every module is read from its source, those inside functions included. The
order, highest first (a module imports from its own rank or a lower one):

    cli > tasks, plan > training, inference > lora, weights > models > data > config > kernels
        > the flat utilities (checks, trees, fsutil, sharding, distributed, hostmem, entrypoint)

config sits above kernels because a model config names its kernel set from the selector's table.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxgpt"
RANKS = {"kernels": 1, "config": 2, "data": 3, "models": 4, "lora": 5, "weights": 5,
         "training": 6, "inference": 6, "tasks": 7, "plan": 7, "cli": 8}
UTILITY = 0  # every other module directly in jaxgpt/


def group_of(module: str) -> str:
    """'jaxgpt.training.step' -> 'training'; 'jaxgpt.config' -> 'config'; 'jaxgpt.trees' -> 'trees'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "jaxgpt"


def rank_of(module: str) -> int:
    return RANKS.get(group_of(module), UTILITY)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    base = root / Path(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def read_imports(path: Path, root: Path = PACKAGE.parent):
    """(line, module, names) for every jaxgpt import in the file, at any depth: `from jaxgpt.a
    import b` is module jaxgpt.a.b when b is a submodule, else module jaxgpt.a with names [b]."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "jaxgpt"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, f"<relative import in {path.name}>", []))
            elif node.module and node.module.split(".")[0] == "jaxgpt":
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if _is_module(root, sub):
                        out.append((node.lineno, sub, []))
                    else:
                        out.append((node.lineno, node.module, [alias.name]))
    return out


def module_aliases(tree: ast.AST, root: Path) -> set[str]:
    """Local names bound to jaxgpt modules (`from jaxgpt.kernels import attention as _a`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxgpt"):
            for a in node.names:
                if _is_module(root, f"{node.module}.{a.name}"):
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.asname and a.name.startswith("jaxgpt")}
    return names


def modules(package: Path = PACKAGE):
    return [(module_name(p, package), p) for p in sorted(package.rglob("*.py"))]


def order_violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for name, path in modules(package):
        if name == "jaxgpt":
            continue  # the public API re-exports from every rank, lazily
        for line, target, _ in read_imports(path, package.parent):
            if target.startswith("<"):
                found.append(f"{path}:{line}: {target}; use the absolute name")
            elif target != "jaxgpt" and rank_of(target) > rank_of(name):
                found.append(f"{path.relative_to(package.parent)}:{line}: {name} "
                             f"({group_of(name)}) imports {target} ({group_of(target)})")
    return found


def private_violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for name, path in modules(package):
        for line, target, names in read_imports(path, package.parent):
            for n in names:
                if n.startswith("_") and target != name:
                    found.append(f"{path.relative_to(package.parent)}:{line}: {n} from {target}")
        tree = ast.parse(path.read_text())
        aliases = module_aliases(tree, package.parent)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: "
                             f"{node.value.id}.{node.attr}")
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = {name for name, _ in modules(package)}
    graph = {}
    for name, path in modules(package):
        if name == "jaxgpt":
            continue
        edges = set()
        for _, target, _ in read_imports(path, package.parent):
            if target in known:
                edges.add(target)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_run_one_way():
    assert order_violations() == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_private_name_crosses_a_module():
    assert private_violations() == []


def test_every_rank_has_modules():
    groups = {group_of(name) for name, _ in modules()}
    assert set(RANKS) <= groups


def test_the_checks_catch_what_they_forbid(tmp_path):
    # A copy of the package's shape with one planted fault of each kind: each is reported.
    fake = tmp_path / "jaxgpt"
    for sub in ("kernels", "training", "models"):
        (fake / sub).mkdir(parents=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "training" / "step.py").write_text("X = 1\n")
    (fake / "kernels" / "dense.py").write_text("def f():\n    from jaxgpt.training import step\n")
    (fake / "models" / "a.py").write_text("def f():\n    from jaxgpt.models.b import _hidden\n")
    (fake / "models" / "b.py").write_text("from jaxgpt.models import a\n_hidden = 1\n")
    (fake / "models" / "c.py").write_text("from jaxgpt.models import b as mb\nY = mb._hidden\n")
    found = order_violations(fake)
    assert len(found) == 1 and "jaxgpt.kernels.dense (kernels) imports jaxgpt.training.step" in found[0]
    assert cycles(import_graph(fake)) == [["jaxgpt.models.a", "jaxgpt.models.b"]]
    private = private_violations(fake)
    assert len(private) == 2 and "_hidden from jaxgpt.models.b" in private[0] and "mb._hidden" in private[1]


def test_import_jaxgpt_loads_nothing_heavy():
    code = ("import sys, jaxgpt; "
            "print(sorted(m for m in sys.modules if m.startswith(('jax', 'flax', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "['jaxgpt']"


def test_public_api_imports_without_jax_work():
    # Every exported name resolves, and reaching them all starts no JAX backend: no device is
    # opened, nothing is traced or compiled at import time.
    code = ("import jaxgpt\n"
            "missing = [n for n in jaxgpt.__all__ if getattr(jaxgpt, n, None) is None]\n"
            "from jax._src import xla_bridge\n"
            "print(missing, sorted(xla_bridge._backends))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[] []"
