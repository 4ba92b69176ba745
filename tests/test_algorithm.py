"""The gossip learning algorithms (p2pfm/learn/algorithm.py): dpsgd, diloco, scaffold, and their settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from p2pfm.config.node_config import load_node_config
from p2pfm.config.schema import decode
from p2pfm.config.settings import GossipSettings
from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.core.identity import Identity
from p2pfm.core.topology import mixing_matrix, parse_topology
from p2pfm.learn.algorithm import ALGORITHMS, RoundAlgorithm
from p2pfm.learn.learner import QuadraticLearner, quadratic_problem

Array = np.ndarray[Any, Any]

DPSGD = GossipSettings()
SCAFFOLD = GossipSettings(algorithm="scaffold")
RING4 = mixing_matrix(parse_topology("ring:4"))


def _state(*values: float, dtype: Any = np.float32) -> dict[str, Array]:
    return {"x": np.array(values, dtype=dtype)}


# --------------------------------------------------------------------------- #
# dpsgd and diloco
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dpsgd_keeps_the_mix_and_its_dtype(dtype: Any) -> None:
    algorithm = RoundAlgorithm(DPSGD)
    assert not algorithm.needs_start and algorithm.correction() is None
    start = {"x": np.array([1.0, 2.0], dtype), "y": np.zeros((2, 2), dtype)}
    algorithm.begin(start)
    local = {"x": np.array([0.5, 1.5], dtype), "y": np.ones((2, 2), dtype)}
    mixed = {"x": np.array([0.25, -3.0], dtype), "y": np.full((2, 2), 0.5, dtype)}
    out = algorithm.finish(local, mixed, 8)
    assert out.keys() == mixed.keys()
    for name, value in mixed.items():
        assert out[name].dtype == dtype
        np.testing.assert_array_equal(out[name], value)
    assert algorithm.correction() is None and algorithm.state_dict() == {}  # dpsgd keeps no state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_diloco_keeps_the_dtype(dtype: Any) -> None:
    algorithm = RoundAlgorithm(GossipSettings(algorithm="diloco", outer_lr=0.7, outer_momentum=0.9))
    for k in range(3):
        algorithm.begin(_state(1.0 + k, 2.0, dtype=dtype))
        out = algorithm.finish(_state(0.0, 0.0, dtype=dtype), _state(0.5, 1.0, dtype=dtype), 4)
        assert out["x"].dtype == dtype


def test_diloco_with_unit_rate_and_no_momentum_is_dpsgd() -> None:
    rng = np.random.default_rng(0)
    diloco, dpsgd = RoundAlgorithm(GossipSettings(algorithm="diloco")), RoundAlgorithm(DPSGD)
    assert diloco.needs_start
    state = {"x": rng.standard_normal(5).astype(np.float32)}
    for _ in range(4):
        diloco.begin(state)
        dpsgd.begin(state)
        local = {"x": state["x"] - 0.1 * rng.standard_normal(5).astype(np.float32)}
        mixed = {"x": rng.standard_normal(5).astype(np.float32)}
        got, want = diloco.finish(local, mixed, 8), dpsgd.finish(local, mixed, 8)
        np.testing.assert_allclose(got["x"], want["x"], rtol=0, atol=1e-6)
        state = got


def test_diloco_nesterov_by_hand() -> None:
    """eta = 0.5, mu = 0.5: v = mu v + g, x = x0 - eta (g + mu v), g = x0 - mixed (all exact in binary)."""
    algorithm = RoundAlgorithm(GossipSettings(algorithm="diloco", outer_lr=0.5, outer_momentum=0.5))
    junk = _state(99.0, -99.0)  # what the local steps reached: diloco looks only at x0 and the mix
    # Round 1: x0 = (1, 2), mix (0.5, 1): g = (0.5, 1), v = g, x1 = x0 - 0.5 (g + 0.5 v) = (0.625, 1.25).
    algorithm.begin(_state(1.0, 2.0))
    x1 = algorithm.finish(junk, _state(0.5, 1.0), 8)
    np.testing.assert_array_equal(x1["x"], [0.625, 1.25])
    # Round 2: mix (0.125, 1): g = (0.5, 0.25), v = 0.5 (0.5, 1) + g = (0.75, 0.75),
    # x2 = x1 - 0.5 (g + 0.5 v) = (0.625, 1.25) - (0.4375, 0.3125) = (0.1875, 0.9375).
    algorithm.begin(x1)
    x2 = algorithm.finish(junk, _state(0.125, 1.0), 8)
    np.testing.assert_array_equal(x2["x"], [0.1875, 0.9375])
    np.testing.assert_array_equal(algorithm.state_dict()["momentum/x"], [0.75, 0.75])
    # Round 3: the mix is x2 itself (g = 0): momentum alone moves on, v = (0.375, 0.375),
    # x3 = x2 - 0.5 * 0.5 * v = x2 - 0.09375.
    algorithm.begin(x2)
    x3 = algorithm.finish(junk, x2, 8)
    np.testing.assert_array_equal(x3["x"], [0.09375, 0.84375])
    np.testing.assert_array_equal(algorithm.state_dict()["momentum/x"], [0.375, 0.375])
    assert algorithm.correction() is None  # diloco never corrects the local steps


def test_fedadam_by_hand() -> None:
    """Adam on the pseudo-gradient g = x0 - m: the first step is outer_lr x sign(g) (bias-corrected)."""
    algorithm = RoundAlgorithm(GossipSettings(algorithm="fedadam", outer_lr=0.1, outer_momentum=0.5))
    assert algorithm.needs_start
    algorithm.begin(_state(1.0, 2.0, 0.0, dtype=np.float64))
    out = algorithm.finish(_state(9.0, 9.0, 9.0), _state(0.0, 3.0, 0.0, dtype=np.float64), 4)
    np.testing.assert_allclose(out["x"], [0.9, 2.1, 0.0], atol=1e-7)  # g = (1, -1, 0)
    # Second step from x0 = out with g2 = (2, -1, 0): m = 0.5 g1 + 0.5 g2 ... by hand.
    g1, g2 = np.array([1.0, -1.0, 0.0]), np.array([2.0, -1.0, 0.0])
    m = 0.5 * (0.5 * g1) + 0.5 * g2
    v = 0.99 * (0.01 * g1**2) + 0.01 * g2**2
    step = (m / (1 - 0.5**2)) / (np.sqrt(v / (1 - 0.99**2)) + 1e-8)
    algorithm.begin(out)
    out2 = algorithm.finish(out, {"x": out["x"] - g2}, 4)
    np.testing.assert_allclose(out2["x"], out["x"] - 0.1 * step, atol=1e-9)
    algorithm.begin(out2)  # a consensus round (no local steps) only mixes
    np.testing.assert_array_equal(algorithm.finish(out2, {"x": out2["x"] + 5.0}, 0)["x"], out2["x"] + 5.0)


def test_diloco_without_a_start_returns_the_mix() -> None:
    """Before any ``begin`` (e.g. a round the node did not start) there is no x0: the mix is kept."""
    algorithm = RoundAlgorithm(GossipSettings(algorithm="diloco", outer_lr=0.5, outer_momentum=0.5))
    out = algorithm.finish(_state(0.0, 0.0), _state(3.0, 4.0), 8)
    np.testing.assert_array_equal(out["x"], [3.0, 4.0])
    assert algorithm.state_dict() == {}


# --------------------------------------------------------------------------- #
# scaffold
# --------------------------------------------------------------------------- #


def test_scaffold_correction_is_the_scaled_residual_and_accumulates() -> None:
    algorithm = RoundAlgorithm(GossipSettings(algorithm="scaffold", drift_beta=0.5))
    assert not algorithm.needs_start
    assert algorithm.correction() is None  # nothing learned before a round
    # Round 1, 4 steps: c = 0.5 * ((3, 0) - (1, 2)) / 4 = (0.25, -0.25); the next state is the mix.
    out = algorithm.finish(_state(1.0, 2.0), _state(3.0, 0.0), 4)
    np.testing.assert_array_equal(out["x"], [3.0, 0.0])
    correction = algorithm.correction()
    assert correction is not None
    np.testing.assert_array_equal(correction["x"], [0.25, -0.25])
    # Round 2, 2 steps: c += 0.5 * ((1, 1) - (0, 0)) / 2 = (0.25, 0.25) -> (0.5, 0).
    algorithm.finish(_state(0.0, 0.0), _state(1.0, 1.0), 2)
    correction = algorithm.correction()
    assert correction is not None
    np.testing.assert_array_equal(correction["x"], [0.5, 0.0])
    assert correction["x"].dtype == np.float32
    # A round without local steps (a consensus round) teaches nothing: c is unchanged.
    out = algorithm.finish(_state(10.0, 10.0), _state(-5.0, 7.0), 0)
    np.testing.assert_array_equal(out["x"], [-5.0, 7.0])
    correction = algorithm.correction()
    assert correction is not None
    np.testing.assert_array_equal(correction["x"], [0.5, 0.0])
    assert set(algorithm.state_dict()) == {"correction/x"}


def test_scaffold_zero_step_first_round_leaves_no_correction() -> None:
    algorithm = RoundAlgorithm(SCAFFOLD)
    algorithm.finish(_state(1.0), _state(2.0), 0)
    assert algorithm.correction() is None


def _synchronous_rounds(
    settings: GossipSettings, *, rounds: int, steps: int = 8, spread: float = 3.0
) -> tuple[list[float], list[QuadraticLearner], list[RoundAlgorithm]]:
    """4 quadratic learners on ring:4, mixed synchronously with the Metropolis matrix (every node heard).

    Returns the mean relative distance to the optimum after each round, the learners and their algorithms.
    """
    centres, optimum = quadratic_problem(nodes=4, dim=20, spread=spread)
    learners = [QuadraticLearner(centre, optimum, lr=0.1) for centre in centres]
    algorithms = [RoundAlgorithm(settings) for _ in learners]
    history = []
    for _ in range(rounds):
        local = []
        for learner, algorithm in zip(learners, algorithms, strict=True):
            if algorithm.needs_start:
                algorithm.begin(learner.get_state())
            learner.train_steps(steps, algorithm.correction())
            local.append(learner.get_state())
        for i, (learner, algorithm) in enumerate(zip(learners, algorithms, strict=True)):
            mixed = {"x": sum(RING4[i, j] * local[j]["x"] for j in range(4)).astype(np.float32)}
            learner.set_state(algorithm.finish(local[i], mixed, steps))
        history.append(float(np.mean([learner.evaluate()["distance"] for learner in learners])))
    return history, learners, algorithms


def test_ring_metropolis_matrix_is_doubly_stochastic() -> None:
    """The premise of the zero-sum claim below."""
    np.testing.assert_allclose(RING4.sum(axis=0), 1.0)
    np.testing.assert_allclose(RING4.sum(axis=1), 1.0)
    np.testing.assert_allclose(RING4, RING4.T)


def test_scaffold_corrections_sum_to_zero_over_the_network() -> None:
    for rounds in (1, 5, 20):
        _, _, algorithms = _synchronous_rounds(SCAFFOLD, rounds=rounds)
        corrections = []
        for algorithm in algorithms:
            correction = algorithm.correction()
            assert correction is not None
            corrections.append(correction["x"])
        size = max(float(np.abs(c).max()) for c in corrections)
        assert size > 0.1  # each node is corrected, by a lot (measured: about 0.55 per coordinate)
        # ... but not the network's average (measured: about 5e-8, float32 rounding)
        np.testing.assert_allclose(np.mean(corrections, axis=0), 0.0, atol=1e-5)


def test_scaffold_removes_client_drift_that_dpsgd_keeps() -> None:
    """Heterogeneous quadratics, 8 local steps, ring:4, 30 rounds.

    Measured: dpsgd settles at a mean relative distance of 0.367 from the
    optimum (the client-drift bias of local steps), scaffold at 1.6e-7. The
    bound (1% of dpsgd's) leaves four orders of magnitude of margin and
    still fails for broken corrections: a sign flip diverges (2.6e7), no
    correction gives dpsgd's 0.367, a correction 8x too small (dividing by
    the steps twice) 0.038, one 8x too large diverges.
    """
    dpsgd, _, _ = _synchronous_rounds(DPSGD, rounds=30)
    scaffold, _, _ = _synchronous_rounds(SCAFFOLD, rounds=30)
    assert dpsgd[-1] > 0.3, dpsgd[-1]  # the problem is heterogeneous enough for drift to matter
    assert abs(dpsgd[-1] - dpsgd[-2]) < 1e-4  # ... and dpsgd has settled: this bias is final
    assert scaffold[-1] < 0.01 * dpsgd[-1], (scaffold[-1], dpsgd[-1])
    assert scaffold[-1] < scaffold[9] < scaffold[0]  # and it keeps getting closer
    half, _, _ = _synchronous_rounds(GossipSettings(algorithm="scaffold", drift_beta=0.5), rounds=30)
    assert half[-1] < 0.01 * dpsgd[-1], half[-1]  # measured 9e-6: slower, same fixed point


def test_diloco_with_momentum_does_not_diverge() -> None:
    """outer_lr 0.7, momentum 0.9 on the same problem: measured peak 0.89 (round 1), end 0.3667 (dpsgd's)."""
    dpsgd, _, _ = _synchronous_rounds(DPSGD, rounds=30)
    diloco, _, _ = _synchronous_rounds(
        GossipSettings(algorithm="diloco", outer_lr=0.7, outer_momentum=0.9), rounds=30
    )
    assert all(np.isfinite(diloco)), diloco
    assert max(diloco) < 1.5, diloco
    assert diloco[-1] < 1.1 * dpsgd[-1], (diloco[-1], dpsgd[-1])


# --------------------------------------------------------------------------- #
# state_dict
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "settings",
    [
        GossipSettings(algorithm="diloco", outer_lr=0.7, outer_momentum=0.9),
        GossipSettings(algorithm="scaffold", drift_beta=0.5),
        GossipSettings(algorithm="fedadam", outer_lr=0.05, outer_momentum=0.9),
        DPSGD,
    ],
    ids=lambda s: s.algorithm,
)
def test_a_restored_algorithm_continues_identically(settings: GossipSettings) -> None:
    rng = np.random.default_rng(1)

    def arrays() -> dict[str, Array]:
        return {"a": rng.standard_normal(3).astype(np.float32), "b": rng.standard_normal((2, 2))}

    original = RoundAlgorithm(settings)
    state = arrays()
    for _ in range(2):
        original.begin(state)
        state = original.finish(arrays(), arrays(), 4)
    saved = original.state_dict()
    expected_keys = {
        "diloco": {"momentum/a", "momentum/b"},
        "scaffold": {"correction/a", "correction/b"},
        "fedadam": {"momentum/a", "momentum/b", "second/a", "second/b", "outer_steps/count"},
        "dpsgd": set(),
    }[settings.algorithm]
    assert set(saved) == expected_keys
    for value in saved.values():  # copies: the algorithm's own state is not exposed
        value[...] = 1000.0
    restored = RoundAlgorithm(settings)
    restored.load_state_dict(original.state_dict())
    local, mixed = arrays(), arrays()
    for algorithm in (original, restored):
        algorithm.begin(state)
    out_original = original.finish(local, mixed, 4)
    out_restored = restored.finish(local, mixed, 4)
    for name in out_original:
        np.testing.assert_array_equal(out_restored[name], out_original[name])
        assert out_restored[name].dtype == out_original[name].dtype
    after_original, after_restored = original.state_dict(), restored.state_dict()
    assert after_original.keys() == after_restored.keys()
    for name in after_original:
        np.testing.assert_array_equal(after_restored[name], after_original[name])
    c_original, c_restored = original.correction(), restored.correction()
    assert (c_original is None) == (c_restored is None)


def test_load_state_dict_empty_is_a_fresh_start() -> None:
    algorithm = RoundAlgorithm(SCAFFOLD)
    algorithm.finish(_state(0.0), _state(1.0), 1)
    algorithm.load_state_dict({})
    assert algorithm.correction() is None and algorithm.state_dict() == {}


@pytest.mark.parametrize("key", ["velocity/x", "x", "momentum/", "correction", "Momentum/x"])
def test_load_state_dict_refuses_unknown_entries(key: str) -> None:
    algorithm = RoundAlgorithm(SCAFFOLD)
    algorithm.finish(_state(0.0), _state(1.0), 1)
    before = algorithm.state_dict()
    with pytest.raises(LocalProtocolError, match="unexpected algorithm state entry"):
        algorithm.load_state_dict({"correction/y": np.ones(1), key: np.zeros(1)})
    after = algorithm.state_dict()  # nothing half-loaded
    assert after.keys() == before.keys()
    np.testing.assert_array_equal(after["correction/x"], before["correction/x"])


# --------------------------------------------------------------------------- #
# [gossip] settings
# --------------------------------------------------------------------------- #


def test_algorithm_names() -> None:
    assert ALGORITHMS == ("dpsgd", "diloco", "scaffold", "fedadam")
    assert GossipSettings().algorithm == "dpsgd" and GossipSettings().consensus_rounds == 0


def test_gossip_algorithm_settings_from_a_table() -> None:
    gossip = decode(
        GossipSettings,
        {
            "algorithm": "diloco",
            "outer_lr": 2,
            "outer_momentum": 0.9,
            "drift_beta": 1,
            "consensus_rounds": 100,
        },
        "gossip",
    )
    assert (gossip.algorithm, gossip.outer_lr, gossip.outer_momentum) == ("diloco", 2.0, 0.9)
    assert (gossip.drift_beta, gossip.consensus_rounds) == (1.0, 100)


@pytest.mark.parametrize(
    ("table", "name", "problem"),
    [
        ({"algorithm": "fedavg"}, "gossip.algorithm", "must be one of 'dpsgd', 'diloco', 'scaffold'"),
        ({"outer_lr": 0}, "gossip.outer_lr", "must be in (0, 2], got 0"),
        ({"outer_lr": 3}, "gossip.outer_lr", "must be in (0, 2], got 3"),
        ({"outer_momentum": 1}, "gossip.outer_momentum", "must be in [0, 1), got 1"),
        ({"drift_beta": 0}, "gossip.drift_beta", "must be in (0, 1], got 0"),
        ({"drift_beta": 1.5}, "gossip.drift_beta", "must be in (0, 1], got 1.5"),
        ({"consensus_rounds": -1}, "gossip.consensus_rounds", "must be in [0, 100], got -1"),
        ({"consensus_rounds": 1.5}, "gossip.consensus_rounds", "must be an integer"),
    ],
)
def test_gossip_algorithm_settings_errors_name_the_field(
    table: dict[str, object], name: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        decode(GossipSettings, table, "gossip")
    assert info.value.field == name
    assert info.value.problem.startswith(problem), info.value.problem


def _node_doc(gossip: dict[str, object]) -> dict[str, object]:
    peer = Identity(b"\7" * 32).peer_id.hex
    return {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:5550", "network": "net", "out": "out"},
        "peers": [{"id": peer, "address": "tcp://127.0.0.1:5551", "name": "b"}],
        "model": {"path": "minilm", "task": "classification", "num_labels": 5},
        "gossip": {"rounds": 3, **gossip},
    }


@pytest.mark.parametrize(
    ("gossip", "field"),
    [
        ({"algorithm": "SCAFFOLD"}, "gossip.algorithm"),
        ({"outer_lr": 0.0}, "gossip.outer_lr"),
        ({"outer_lr": 3.0}, "gossip.outer_lr"),
        ({"outer_momentum": 1.0}, "gossip.outer_momentum"),
        ({"drift_beta": 0.0}, "gossip.drift_beta"),
        ({"consensus_rounds": -1}, "gossip.consensus_rounds"),
    ],
)
def test_a_node_config_names_the_bad_algorithm_field(
    tmp_path: Path, gossip: dict[str, object], field: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(_node_doc(gossip)))
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert info.value.field == field, str(info.value)


def test_a_node_config_carries_the_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    gossip = {"algorithm": "scaffold", "drift_beta": 0.5, "consensus_rounds": 2}
    path.write_text(tomli_w.dumps(_node_doc(gossip)))
    config = load_node_config(path)
    assert (config.gossip.algorithm, config.gossip.drift_beta, config.gossip.consensus_rounds) == (
        "scaffold",
        0.5,
        2,
    )
