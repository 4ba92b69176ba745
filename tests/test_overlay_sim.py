"""``p2pfm simulate overlay``: open networks of real node loops (p2pfm/lab/overlay_sim.py)."""

from __future__ import annotations

import json

import pytest

from p2pfm.cli import main
from p2pfm.core.errors import LocalProtocolError
from p2pfm.lab.overlay_sim import OverlayConfig, simulate_overlay


def test_bootstrap_only_every_view_is_full_within_five_rounds() -> None:
    result = simulate_overlay(OverlayConfig(nodes=48, rounds=6, degree=4, bootstrap_only=True, dim=8))
    late = result.rounds[4:]
    assert all(r.members == 48 and r.components == 1 and r.min_active_view >= 4 for r in late)
    distances = [r.consensus_distance for r in result.rounds]
    assert distances[-1] < 0.8 * distances[0]
    assert result.control_rejected == {} and result.rejected == {}


def test_half_crashing_heals_into_one_component_within_three_rounds_and_keeps_converging() -> None:
    result = simulate_overlay(OverlayConfig(nodes=48, rounds=16, degree=4, crash=(0.5, 6), dim=8, seed=1))
    by_round = {r.round: r for r in result.rounds}
    assert by_round[7].members == 24
    assert all(by_round[r].components == 1 for r in range(9, 17))
    assert by_round[16].consensus_distance < 0.5 * by_round[9].consensus_distance
    assert result.view_changes.get("dead", 0) > 0


def test_joiners_take_the_networks_state_and_leavers_are_dropped_at_once() -> None:
    config = OverlayConfig(nodes=32, rounds=20, degree=4, join=(8, 8), leave=(4, 8), dim=8, seed=2)
    result = simulate_overlay(config)
    by_round = {r.round: r for r in result.rounds}
    before = by_round[8].consensus_distance
    assert by_round[20].members == 32 + 8 - 4
    assert max(r.consensus_distance for r in result.rounds[9:]) < 10 * before  # joiners bring no fresh noise
    assert by_round[20].consensus_distance < before
    assert result.view_changes.get("left", 0) >= 4


def test_the_cli_prints_the_rounds_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "overlay", "--nodes", "16", "--degree", "3", "--rounds", "4", "--dim", "4", "--json"]
    assert main([*args, "--crash", "0.25@2", "--join", "2@2", "--leave", "1@3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    keys = {"round", "members", "components", "min_active_view", "mean_active_view", "consensus_distance"}
    assert all(set(r) == keys for r in doc["rounds"])


def test_bad_overlay_flags_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "overlay", "--nodes", "8", "--rounds", "4", "--join", "three@2"]) == 1
    assert "--join" in capsys.readouterr().err
    with pytest.raises(LocalProtocolError, match="crash round"):
        OverlayConfig(nodes=8, rounds=4, crash=(0.5, 4))


def test_the_robust_rules_still_hold_attackers_off_on_the_overlay() -> None:
    attacks = ((5, "scale", 10.0), (9, "noise", None))
    drift = {
        rule: simulate_overlay(
            OverlayConfig(nodes=32, rounds=12, degree=6, dim=8, attacks=attacks, rule=rule)  # type: ignore[arg-type]
        ).honest_drift
        for rule in ("mean", "trimmed-mean", "clip")
    }
    assert drift["mean"] > 10.0  # the plain mean follows the attackers far away ...
    assert drift["trimmed-mean"] < 0.2 and drift["clip"] < 0.2, drift  # ... the robust rules do not
