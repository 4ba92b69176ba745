from __future__ import annotations

import numpy as np
import pytest

from p2pfm.core.errors import LocalProtocolError
from p2pfm.lab.sim import SimConfig, fit_decay_rate, float_floor, simulate


@pytest.mark.parametrize(("spec", "rounds"), [("ring:16", 300), ("torus:4x4", 60), ("exp:16", 40)])
def test_measured_decay_matches_lambda2_squared(spec: str, rounds: int) -> None:
    result = simulate(SimConfig(spec, rounds=rounds, dim=64, seed=1, dtype="float64"))
    distances = [r.consensus_distance for r in result.rounds]
    measured = fit_decay_rate(distances, floor=float_floor("float64"))
    predicted = result.lambda2**2
    assert measured == pytest.approx(predicted, rel=0.05)
    assert result.rejected == 0
    assert all(r.delivered == r.messages for r in result.rounds[1:])


def test_float32_wire_also_tracks_lambda2_squared() -> None:
    result = simulate(SimConfig("torus:4x4", rounds=40, dim=64, seed=2, dtype="float32"))
    distances = [r.consensus_distance for r in result.rounds]
    measured = fit_decay_rate(distances, floor=float_floor("float32"))
    assert measured == pytest.approx(result.lambda2**2, rel=0.05)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_no_loss_preserves_the_network_mean(dtype: str) -> None:
    result = simulate(SimConfig("ring:8", rounds=30, dim=32, seed=5, dtype=dtype))
    start = np.stack([s["x"] for s in result.initial_states]).astype(np.float64)
    final = np.stack([s["x"] for s in result.final_states]).astype(np.float64)
    tolerance = 30 * np.finfo(dtype).eps * np.abs(start).max()
    np.testing.assert_allclose(final.mean(axis=0), start.mean(axis=0), rtol=0, atol=tolerance)
    assert result.rounds[-1].consensus_distance < 1e-2 * result.rounds[0].consensus_distance


def test_drops_are_counted_and_slow_consensus_down() -> None:
    clean = simulate(SimConfig("ring:8", rounds=20, dim=16, seed=3))
    lossy = simulate(SimConfig("ring:8", rounds=20, dim=16, seed=3, drop_prob=0.5))
    sent = sum(r.messages for r in lossy.rounds)
    delivered = sum(r.delivered for r in lossy.rounds)
    assert sent == 20 * 16
    assert 0.35 * sent < delivered < 0.65 * sent
    assert lossy.rounds[-1].consensus_distance > clean.rounds[-1].consensus_distance
    assert lossy.rounds[-1].consensus_distance < lossy.rounds[0].consensus_distance
    total_loss = simulate(SimConfig("ring:8", rounds=3, dim=16, seed=3, drop_prob=1.0))
    assert total_loss.rounds[-1].consensus_distance == pytest.approx(total_loss.rounds[0].consensus_distance)


def test_json_shape() -> None:
    result = simulate(SimConfig("complete:4", rounds=2, dim=8)).as_json()
    assert set(result) >= {"topology", "nodes", "lambda2", "rounds"}
    assert [set(r) >= {"round", "consensus_distance", "messages", "bytes"} for r in result["rounds"]] == [
        True
    ] * 3
    assert result["rounds"][0]["messages"] == 0 and result["rounds"][1]["messages"] == 12
    # complete graph: one round averages exactly (lambda2 = 0).
    assert result["rounds"][1]["consensus_distance"] < 1e-12


def test_bad_settings_and_short_fits() -> None:
    with pytest.raises(LocalProtocolError):
        SimConfig("ring:4", rounds=1, drop_prob=1.5)
    with pytest.raises(LocalProtocolError):
        SimConfig("ring:4", rounds=1, dtype="int8")
    with pytest.raises(LocalProtocolError):
        fit_decay_rate([1.0, 0.5])


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "clip"])
def test_robust_rules_run_in_the_simulator_and_still_reach_consensus(rule: str) -> None:
    mean = simulate(SimConfig("exp:8", rounds=15, dim=16, seed=4))
    robust = simulate(SimConfig("exp:8", rounds=15, dim=16, seed=4, rule=rule))  # type: ignore[arg-type]
    assert robust.rejected == 0
    assert robust.rounds[-1].consensus_distance < 1e-2 * robust.rounds[0].consensus_distance
    assert [r.consensus_distance for r in robust.rounds] != [r.consensus_distance for r in mean.rounds]
    with pytest.raises(LocalProtocolError):
        SimConfig("ring:4", rounds=1, rule="krum")  # type: ignore[arg-type]
