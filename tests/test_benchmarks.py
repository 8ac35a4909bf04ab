"""The benchmarks stay one script per question over one shared helper module, and the README says
what each is for: no script redefines another's helper, each starts (its --help runs, so its
imports resolve against the current package), and the README's Benchmarks section names each
script exactly once."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SHARED = ("common.py", "train_peers.py")  # imported by the scripts, not run
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in SHARED)
ENTRY_NAMES = {"main", "parse_args"}  # every script has its own


def top_level_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_no_helper_is_written_twice():
    seen: dict[str, str] = {}
    doubles = []
    for name in SHARED + tuple(SCRIPTS):
        for fn in top_level_functions(BENCH / name) - ENTRY_NAMES:
            if fn in seen:
                doubles.append(f"{fn} in {seen[fn]} and {name}")
            seen[fn] = name
    assert doubles == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_uses_the_shared_helpers_and_starts(name):
    source = (BENCH / name).read_text()
    assert re.search(r"^from (common|train_peers) import", source, re.M), \
        f"{name} does not import benchmarks/common.py (or train_peers.py, which does)"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(BENCH / name), "--help"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_readme_names_each_script_once():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Benchmarks\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^- `([\w.]+)`:", section, re.M)
    expected = SCRIPTS + sorted(p.name for p in BENCH.glob("*.sh"))
    assert sorted(items) == sorted(expected)
    for shared in SHARED:
        assert f"benchmarks/{shared}" in section
