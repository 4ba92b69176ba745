"""The ``p2pfm`` pytest plugin (entry point ``pytest11``): fixtures for an in-process gossip network.

``def test_my_rule(gossip_network): result = gossip_network("ring:8", rounds=30, rule="median")``
runs real node loops (p2pfm/lab/sim.py) and returns the typed
``SimulationResult`` of ``p2pfm.simulate``; docs/testing.md has the fixtures
and a complete example. Every project that installs p2pfm loads this
module in each pytest run, so it imports nothing heavy at import time: the
simulator loads on a fixture's first call, torch only for ``tiny_model``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from p2pfm.simulation import SimulationResult
    from p2pfm.testing.tiny import TinyModel

DEFAULT_TOPOLOGY = "ring:4"


def seed_for(nodeid: str) -> int:
    """A stable seed per test: the same on every run, different between tests (32 bits of a digest)."""
    return int.from_bytes(hashlib.blake2b(nodeid.encode("utf-8"), digest_size=4).digest(), "big")


class GossipNetwork:
    """Runs ``p2pfm.simulate``: call it with a topology and any of ``simulate``'s keyword arguments.

    ``seed`` defaults to the test's own (``p2pfm_seed``); ``defaults`` are
    keyword arguments every call of this test gets unless it passes its
    own; ``runs`` keeps every result of the test, in order.
    """

    def __init__(self, seed: int, **defaults: Any) -> None:
        self.seed = seed
        self.defaults = defaults
        self.runs: list[SimulationResult] = []

    def __call__(self, topology: Any = DEFAULT_TOPOLOGY, **options: Any) -> SimulationResult:
        from p2pfm.simulation import simulate  # noqa: PLC0415  (the plugin loads in every pytest run)

        result = simulate(topology, **{"seed": self.seed, **self.defaults, **options})
        self.runs.append(result)
        return result

    @property
    def last(self) -> SimulationResult:
        """The latest result of this test."""
        if not self.runs:
            raise LookupError("gossip_network has not run yet")
        return self.runs[-1]


@pytest.fixture
def p2pfm_seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: derived from its node id, so runs repeat exactly and tests differ."""
    return seed_for(request.node.nodeid)


@pytest.fixture
def gossip_network(p2pfm_seed: int) -> GossipNetwork:
    """A factory: ``gossip_network(topology="ring:4", rounds=..., rule=..., learner=..., faults=...)``."""
    return GossipNetwork(p2pfm_seed)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A tiny random BERT classifier and toy topic data in a session folder (loads torch)."""
    from p2pfm.testing.tiny import build_tiny_model  # noqa: PLC0415

    return build_tiny_model(Path(tmp_path_factory.mktemp("p2pfm-tiny-model")))
