"""Live progress of local runs, and a failed node ending the run early (p2pfm/lab/progress.py)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from p2pfm.cli import _build_parser, configure_logging
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import NodeFailedError
from p2pfm.core.logs import node_logger
from p2pfm.lab.progress import LineView, LiveView, MetricsTail, NodeStatus, last_error_line, status_table
from p2pfm.lab.scenario import load_scenario, run_processes, write_node_configs
from tests.conftest import tiny_classifier_toml, topic_examples, write_jsonl

ROUND = {
    "event": "round", "round": 2, "rounds_trained": 2, "train_loss": 0.51, "eval": {"accuracy": 0.75},
    "heard": ["node1"], "missing": ["node2"], "bytes_sent": 2_500_000, "bytes_received": 2_000_000,
    "rejected": {"bad_signature": 3, "stale_round": 1},
}  # fmt: skip


def test_the_tail_yields_each_record_once_and_waits_for_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert list(tail.new_records()) == []  # no file yet: nothing, no error
    path.write_text(json.dumps({"event": "start"}) + "\n" + '{"event": "round", "ro')
    assert [r["event"] for r in tail.new_records()] == ["start"]
    with path.open("a") as handle:
        handle.write('und": 1}\nnot json\n[1, 2]\n')
    assert list(tail.new_records()) == [{"event": "round", "round": 1}]  # junk lines are skipped
    assert list(tail.new_records()) == []
    path.write_text(json.dumps({"event": "done"}) + "\n")  # replaced by a shorter file: read from its start
    assert [r["event"] for r in tail.new_records()] == ["done"]


def test_a_status_follows_the_records_and_ignores_what_it_cannot_read() -> None:
    status = NodeStatus("node0", rounds=5)
    assert not status.absorb({"event": "start"}) and status.state == "training"
    assert status.absorb(ROUND)
    assert (status.round, status.loss, status.evaluation) == (2, 0.51, {"accuracy": 0.75})
    assert (status.heard, status.neighbours, status.refused) == (1, 2, 4)
    assert status.line() == "node0 round 2/5 loss 0.510 test accuracy 0.750 heard 1/2 sent 2.50 MB refused 4"
    # A round without an evaluation keeps the last one; junk values keep the last good ones.
    assert status.absorb({"event": "round", "round": 3, "eval": {}, "bytes_sent": "lots", "train_loss": None})
    assert (status.round, status.evaluation, status.bytes_sent, status.loss) == (
        3,
        {"accuracy": 0.75},
        2_500_000,
        0.51,
    )
    assert not status.absorb({"event": "round", "round": "4"})  # not a round number: not a round
    status.absorb({"event": "done", "stopped": False})
    assert status.state == "done"


def test_the_live_table_shows_every_node() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    a, b = NodeStatus("node0", 5), NodeStatus("node1", 5, state="crashed", detail="restart in 5 s")
    a.absorb(ROUND)
    console.print(status_table([a, b], "t: nodes"))
    text = out.getvalue()
    assert "node0" in text and "0.750" in text and "1/2" in text and "2.50" in text
    assert "crashed (restart in 5 s)" in text
    view = LiveView(Console(file=io.StringIO(), force_terminal=True), "t")  # starts, redraws, stops
    view.refresh([a, b])
    view.close()


def test_the_line_view_logs_one_line_per_round(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2pfm")
    status = NodeStatus("node0", 5)
    status.absorb(ROUND)
    LineView().round_done(status)
    assert caplog.messages == [status.line()]


def test_the_last_error_line_is_the_last_nonempty_line(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("Traceback...\n  File x\nValueError: boom\n\n\n")
    assert last_error_line(log) == "ValueError: boom"
    assert last_error_line(tmp_path / "missing.txt") == ""


def _scenario(tmp_path: Path, tiny_bert_dir: Path, rounds: int, extra: str = "") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(80, seed=3))
    path = tmp_path / "s.toml"
    path.write_text(
        f'name = "progress"\ntopology = "ring:3"\ntimeout_s = 240\n{extra}\n'
        + tiny_classifier_toml(tiny_bert_dir, data)
        + f"[train]\nlocal_steps = 2\nbatch_size = 4\n[gossip]\nrounds = {rounds}\nround_timeout_s = 20\n"
    )
    return path


@pytest.mark.slow
def test_one_failing_node_stops_the_others_at_once(tmp_path: Path, tiny_bert_dir: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, tiny_bert_dir, rounds=200))
    procs = write_node_configs(scenario, tmp_path / "run")
    doc = dict(read_toml(procs[2].config, "config"))
    doc["gossip"] = {**doc["gossip"], "rounds": 0}  # node2 refuses its config: exit status 1
    procs[2].config.write_text(tomli_w.dumps(doc))
    started = time.monotonic()
    with pytest.raises(NodeFailedError) as failed:
        run_processes(procs, (), timeout_s=120.0)
    assert failed.value.node == "node2" and failed.value.exit_status == 1
    assert "gossip.rounds" in failed.value.last_line and str(procs[2].log) in str(failed.value)
    assert time.monotonic() - started < 60.0  # not the 200 rounds the others would run
    assert all(p.popen is not None and p.popen.poll() is not None for p in procs)  # every one stopped
    assert all(p.rounds_done < 200 for p in procs)


@pytest.mark.slow
def test_a_run_prints_rounds_as_they_happen_and_a_failed_run_names_the_node(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    good = _scenario(tmp_path / "good", tiny_bert_dir, rounds=2)
    ran = subprocess.run(
        [sys.executable, "-m", "p2pfm", "run", str(good), "--out", str(tmp_path / "good" / "run")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    for i in range(3):  # one line per node and round, as they happened (not a terminal: plain lines)
        assert f"node{i} round 1/2 loss" in ran.stderr and f"node{i} round 2/2 loss" in ran.stderr
    assert "starting the nodes; each loads its model" in ran.stderr
    assert "mean gossip accuracy" in ran.stdout
    quiet = subprocess.run(
        [sys.executable, "-m", "p2pfm", "report", str(tmp_path / "good" / "run"), "-q"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == ""

    bad = _scenario(tmp_path / "bad", tiny_bert_dir, rounds=2, extra='baselines = ["local"]')
    bad.write_text(bad.read_text().replace(f'path = "{tiny_bert_dir}"', 'path = "/nonexistent/model"'))
    out = tmp_path / "bad" / "run"
    failed = subprocess.run(
        [sys.executable, "-m", "p2pfm", "run", str(bad), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "p2pfm: error: node" in failed.stderr and "failed (exit status" in failed.stderr
    assert "its log: " + str(out / "nodes") in failed.stderr
    assert "/nonexistent/model" in failed.stderr  # the node's own last line says what is wrong
    assert not (out / "baselines").exists() and not (out / "report.md").exists()
    assert "mean gossip" not in failed.stdout


def test_every_subcommand_shows_an_example_and_takes_v_and_q() -> None:
    parser = _build_parser()
    leaves: list[tuple[str, ...]] = []

    def walk(p: object, path: tuple[str, ...]) -> None:
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]  # type: ignore[attr-defined]
        if not subs:
            leaves.append(path)
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, (*path, name))

    walk(parser, ())
    assert len(leaves) >= 14
    for path in leaves:
        sub = parser
        for name in path:
            sub = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
        text = sub.format_help()
        assert "example:" in text and "p2pfm " + path[0] in text, path
        assert "--verbose" in text and "--quiet" in text, path
    args = parser.parse_args(["-q", "topology", "show", "ring:4", "-v", "-v"])
    assert (args.quiet, args.verbose) == (1, 2)  # before and after the subcommand both count
    args = parser.parse_args(["-v", "topology", "show", "ring:4"])
    assert (args.quiet, args.verbose) == (0, 1)  # the subcommand's copy never resets the top level's


def test_log_records_as_json_lines_name_the_node(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(0, json_lines=True)
    try:
        node_logger("p2pfm.node.loop", "node7").info("round 3/6 loss 0.5")
        logging.getLogger("p2pfm.lab.scenario").debug("not shown at the default level")
        [line] = capsys.readouterr().err.splitlines()
        record = json.loads(line)
        assert (
            record["node"] == "node7"
            and record["level"] == "INFO"
            and record["message"] == "round 3/6 loss 0.5"
        )
        assert record["logger"] == "p2pfm.node.loop" and isinstance(record["time_s"], float)
        configure_logging(-1)  # -q: warnings and errors only, as text
        node_logger("p2pfm.node.loop", "node7").info("hidden")
        node_logger("p2pfm.node.loop", "node7").warning("shown")
        assert capsys.readouterr().err.strip().endswith("WARNING [node7] shown")
    finally:
        logger = logging.getLogger("p2pfm")
        for handler in [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_a_nodes_planned_rounds_count_its_consensus_rounds(tmp_path: Path) -> None:
    path = _scenario(tmp_path, tmp_path / "model", rounds=3)  # the model is named, never loaded
    path.write_text(path.read_text().replace("rounds = 3\n", "rounds = 3\nconsensus_rounds = 2\n"))
    procs = write_node_configs(load_scenario(path), tmp_path / "run")
    assert {p.rounds for p in procs} == {5} and procs[0].status.rounds == 5
