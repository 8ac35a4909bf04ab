"""The README's Python examples run as written (from the repository root, as a user would)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> dict[str, str]:
    """{section title: code} for each ```python block that imports jaxgpt."""
    text = (ROOT / "README.md").read_text()
    out = {}
    for section in re.split(r"\n## ", text):
        title = section.splitlines()[0]
        for code in re.findall(r"```python\n(.*?)```", section, re.S):
            if "import jaxgpt" in code:
                out[title] = code
    return out


@pytest.mark.parametrize("title", ["Use it from Python", "Training loop", "Accelerators"])
def test_readme_example_runs(title, tmp_path):
    code = python_blocks()[title]
    # Run from a copy of the configs so the example's runs/ directory lands in tmp_path.
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ,
                                                       "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    if title == "Training loop":
        assert "step 20: loss" in proc.stdout
        assert (tmp_path / "runs" / "readme" / "loss.png").is_file()
