"""The layout's rules (docs/architecture.md): layers import downwards only, and no module imports itself back.

The layer contracts are import-linter's (`lint-imports`, run by .ci/run);
this test adds what import-linter has no contract for: no import cycle
between any two modules, lazy imports included.
"""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest


def test_no_module_imports_itself_back() -> None:
    graph = grimp.build_graph("p2pfm")
    cycles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert cycles == []


@pytest.mark.slow  # starts a process
def test_the_core_and_the_simulator_load_without_torch_or_a_model() -> None:
    code = (
        "import sys, p2pfm.core.wire, p2pfm.core.protocol, p2pfm.lab.sim, p2pfm.node.loop\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
