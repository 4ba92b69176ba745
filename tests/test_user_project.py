"""docs/testing.md's example test runs, as written, in a separate project that only installs p2pfm.

The project is a temporary folder with its own pyproject.toml and tests/
(no conftest, nothing of this repository's tests), run by this
environment's interpreter with the project as the working directory: the
``gossip_network`` fixture can only come from the installed p2pfm's
``pytest11`` entry point. A variant with one assertion turned around must
fail, so the test can tell.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "testing.md"
MARKER = "<!-- example: tests/test_gossip.py -->"
PASSING = "assert result.disagreement() < 1e-3"
FAILING = "assert result.disagreement() > 1e-3"


def example() -> str:
    """The python block right after the example marker of docs/testing.md."""
    text = DOC.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, f"{DOC} must mark its example once"
    found = re.match(r"\s*```python\n(.*?)\n```", text[text.index(MARKER) + len(MARKER) :], re.DOTALL)
    assert found is not None, f"no python block follows {MARKER} in {DOC}"
    return found.group(1) + "\n"


def run_project(folder: Path, test_code: str) -> subprocess.CompletedProcess[str]:
    (folder / "tests").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "my-gossip-rule"\nversion = "0.1.0"\ndependencies = ["p2pfm"]\n\n'
        '[tool.pytest.ini_options]\ntestpaths = ["tests"]\n',
        encoding="utf-8",
    )
    (folder / "tests" / "test_gossip.py").write_text(test_code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.mark.slow  # starts pytest in a process, twice
def test_the_docs_example_passes_in_a_project_that_only_installs_p2pfm(tmp_path: Path) -> None:
    code = example()
    assert "def test_" in code and "gossip_network" in code and "import p2pfm" in code
    passed = run_project(tmp_path / "good", code)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert re.search(r"\b3 passed\b", passed.stdout), passed.stdout
    assert (
        not (tmp_path / "good" / "conftest.py").exists()
        and not (tmp_path / "good" / "tests" / "conftest.py").exists()
    )

    assert code.count(PASSING) == 1, f"the example's assertion {PASSING!r} changed: update this test"
    failed = run_project(tmp_path / "wrong", code.replace(PASSING, FAILING))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.search(r"\b1 failed, 2 passed\b", failed.stdout), failed.stdout
    assert "test_the_nodes_learn_and_agree" in failed.stdout
