"""The prefork server: node processes forked from one warm parent, each its own pid (p2pfm/lab/prefork.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfm.lab import prefork
from p2pfm.lab.prefork import ForkLauncher, ProcessHandle, SubprocessLauncher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server: Linux only")

_PROBE = """
import os, sys, time
print("argv", sys.argv[1:], "env", os.environ.get("PROBE_VALUE"), "parent", os.getppid(), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1:2] == ["sleep"]:
    time.sleep(120)
sys.exit(int(sys.argv[2]) if sys.argv[1:2] == ["exit"] else 0)
"""


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ForkLauncher]:
    """A prefork server that can also run a probe module (tmp_path on its PYTHONPATH)."""
    (tmp_path / "prefork_probe.py").write_text(_PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    launcher = ForkLauncher(tmp_path / "server.log", preload=())  # nothing to import: starts at once
    try:
        yield launcher
    finally:
        launcher.close()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _run(server: ForkLauncher, tmp_path: Path, *argv: str, name: str = "probe") -> tuple[ProcessHandle, Path]:
    log = tmp_path / f"{name}.log"
    child = server.start(
        list(argv),
        log,
        {"PROBE_VALUE": name, "PATH": os.environ["PATH"], "PYTHONPATH": os.environ["PYTHONPATH"]},
        "prefork_probe",
    )
    return child, log


def test_a_forked_child_gets_its_own_argv_environment_log_and_exit_status(
    server: ForkLauncher, tmp_path: Path
) -> None:
    first, first_log = _run(server, tmp_path, "exit", "3", name="one")
    second, second_log = _run(server, tmp_path, name="two")
    assert first.wait(timeout=30) == 3 and second.wait(timeout=30) == 0
    assert first.pid != second.pid and first.poll() == 3
    for log, argv, value in ((first_log, "['exit', '3']", "one"), (second_log, "[]", "two")):
        text = log.read_text()
        assert f"argv {argv} env {value}" in text and "to stderr" in text, text
        parent = int(text.split("parent ")[1].split()[0])
        assert parent != os.getpid()  # forked by the server, not by this process


def test_a_child_is_signalled_by_its_pid_and_its_signal_is_reported(
    server: ForkLauncher, tmp_path: Path
) -> None:
    child, _ = _run(server, tmp_path, "sleep")
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.5)
    assert child.poll() is None and not _gone(child.pid)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == -signal.SIGTERM
    child.kill()  # after the exit: nothing is signalled (the pid may belong to someone else by now)
    assert child.poll() == -signal.SIGTERM
    killed, _ = _run(server, tmp_path, "sleep", name="killed")
    killed.kill()
    assert killed.wait(timeout=30) == -signal.SIGKILL


def test_the_node_command_runs_in_a_child_as_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """``p2pfm`` itself, as the scenario runner starts it (libraries preloaded): a bad config exits 1."""
    launcher = ForkLauncher(tmp_path / "server.log")
    try:
        child = launcher.start(
            ["node", "--config", str(tmp_path / "missing.toml")], tmp_path / "node.log", {}
        )
        assert child.wait(timeout=60) == 1
        assert "p2pfm: error:" in (tmp_path / "node.log").read_text()
    finally:
        launcher.close()


def test_closing_the_launcher_stops_the_children_that_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "prefork_probe.py").write_text(_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    launcher = ForkLauncher(tmp_path / "server.log", preload=())
    child, _ = _run(launcher, tmp_path, "sleep")
    assert not _gone(child.pid)
    started = time.monotonic()
    launcher.close()
    assert _gone(child.pid) and time.monotonic() - started < 15


def test_a_child_outliving_a_killed_server_is_still_stopped_by_its_pid(
    server: ForkLauncher, tmp_path: Path
) -> None:
    child, _ = _run(server, tmp_path, "sleep")
    server._server.kill()  # the server dies without its stdin closing (an OOM kill, say)
    server._server.wait(timeout=30)
    assert child.poll() is None  # still running, now an orphan
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == prefork.UNKNOWN_EXIT  # ended; nobody could tell how
    later, log = _run(server, tmp_path, "exit", "4", name="later")  # no server: a fresh interpreter
    assert isinstance(later, subprocess.Popen) and later.wait(timeout=60) == 4
    assert "argv ['exit', '4'] env later" in log.read_text()


def test_ctrl_c_stops_the_nodes_and_the_server_lives_on_to_report_it(
    server: ForkLauncher, tmp_path: Path
) -> None:
    child, _ = _run(server, tmp_path, "sleep")
    os.kill(server._server.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends the whole group
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) == 1  # KeyboardInterrupt in the probe: a traceback and status 1
    assert server._server.poll() is None
    again, _ = _run(server, tmp_path, name="again")
    assert again.wait(timeout=30) == 0


def test_the_fallback_is_a_fresh_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P2PFM_PREFORK", "0")
    assert isinstance(prefork.launcher(tmp_path / "server.log"), SubprocessLauncher)
    monkeypatch.setattr(prefork, "ForkLauncher", _failing_launcher)
    monkeypatch.delenv("P2PFM_PREFORK")
    assert isinstance(prefork.launcher(tmp_path / "server.log"), SubprocessLauncher)
    child = SubprocessLauncher().start(["--version"], tmp_path / "version.log", dict(os.environ))
    assert child.wait(timeout=60) == 0 and "p2pfm" in (tmp_path / "version.log").read_text()


def _failing_launcher(server_log: Path) -> ForkLauncher:
    raise RuntimeError("the prefork server did not start")
