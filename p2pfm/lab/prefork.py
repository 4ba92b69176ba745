"""Node processes forked from one warm parent: torch, transformers and peft are imported once per run.

A node process spends about 4.8 CPU-seconds importing its libraries
(torch, transformers, peft) before it does anything, on the 2-core machine
more than a short scenario's training. :class:`ForkLauncher` starts one
*prefork server* (``python -m p2pfm.lab.prefork``) that imports them once,
then forks one child per node; the child runs ``python -m p2pfm ...`` (the
same ``p2pfm node`` command a plain process runs) with its own arguments,
environment and log file. Each node is still its own process with its own
pid, killed, signalled and waited for by that pid
(:class:`ForkedProcess` has the parts of ``subprocess.Popen`` the runner
uses); the server only reaps its children and reports their exit statuses.

The server forks from its only thread (numpy's BLAS pool aside, which
handles fork itself) and never touches CUDA, so a child starts as clean as
a fresh interpreter that imported the same modules. Where fork is not the
platform's way (not Linux), where ``P2PFM_PREFORK=0``, or if the server does
not come up, :func:`launcher` gives a :class:`SubprocessLauncher`: a fresh
interpreter per node, as before.

The wire between runner and server is JSON lines: the runner writes
``{"module": "p2pfm", "argv": [...], "log": path, "env": {...}}`` to the server's stdin; the
server answers ``{"pid": N}`` (or ``{"error": text}``) on its stdout, in
order, and ``{"exit": N, "code": C}`` whenever a child ends (``C`` as
``Popen.returncode``: negative for a signal). When the runner goes away
(stdin closes) the server stops its remaining children and exits.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import queue
import runpy
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

_logger = logging.getLogger(__name__)

#: What every node process imports before it starts (the expensive part).
PRELOAD = ("p2pfm.node.factory", "p2pfm.learn.adapter_learner", "p2pfm.config.node_config")
_READY = "ready"
_START_TIMEOUT_S = 180.0  # the imports take ~5 s alone; a loaded machine may take much longer
_SPAWN_TIMEOUT_S = 60.0
_STOP_GRACE_S = 5.0
#: The exit status of a node that ended while its prefork server was gone (nobody could reap it).
UNKNOWN_EXIT = 255


class ProcessHandle(Protocol):
    """The parts of ``subprocess.Popen`` the scenario runner uses."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    def start(
        self, argv: Sequence[str], log: Path, env: Mapping[str, str], module: str = "p2pfm"
    ) -> ProcessHandle:
        """Run ``python -m <module> <argv>`` with ``env``, its stdout and stderr appended to ``log``."""
        ...

    def close(self) -> None: ...


class SubprocessLauncher:
    """A fresh interpreter per node (``subprocess.Popen``)."""

    def start(
        self, argv: Sequence[str], log: Path, env: Mapping[str, str], module: str = "p2pfm"
    ) -> ProcessHandle:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.STDOUT, env=dict(env)
            )

    def close(self) -> None:
        pass


class ForkedProcess:
    """A node forked by the prefork server: signalled by its pid, its exit status reported by the server."""

    def __init__(self, pid: int, server: ForkLauncher) -> None:
        self.pid = pid
        self._server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # never signal a pid the server has reaped (it may be reused)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkLauncher:
    """Runs the prefork server and asks it for one child per node (see the module docstring)."""

    def __init__(self, server_log: Path, preload: Sequence[str] = PRELOAD) -> None:
        self._exits: dict[int, int] = {}
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._changed = threading.Condition()
        self._lock = threading.Lock()  # one request at a time
        self._requested = 0  # the id of the last request: an answer names the request it answers
        self._fallback = SubprocessLauncher()  # if the server goes away mid-run
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with server_log.open("ab") as log:
            self._server = subprocess.Popen(
                [sys.executable, "-m", "p2pfm.lab.prefork", f"--preload={','.join(preload)}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env,
            )  # fmt: skip
        assert self._server.stdin is not None and self._server.stdout is not None
        self._requests: IO[bytes] = self._server.stdin
        self._reader = threading.Thread(
            target=self._read, args=(self._server.stdout,), name="prefork-reader", daemon=True
        )
        self._reader.start()
        answer = self._answer(_START_TIMEOUT_S)
        if answer.get("state") != _READY:
            self.close()
            raise RuntimeError(f"the prefork server did not start (see {server_log}): {answer}")

    def start(
        self, argv: Sequence[str], log: Path, env: Mapping[str, str], module: str = "p2pfm"
    ) -> ProcessHandle:
        with self._lock:
            self._requested += 1
            request = {
                "id": self._requested,
                "module": module,
                "argv": list(argv),
                "log": str(log),
                "env": dict(env),
            }
            try:
                self._requests.write(json.dumps(request).encode() + b"\n")
                self._requests.flush()
            except OSError as exc:  # the server is gone
                answer: dict[str, Any] = {"error": repr(exc)}
            else:
                answer = self._answer(_SPAWN_TIMEOUT_S, self._requested)
        if "pid" not in answer:
            _logger.warning(
                f"the prefork server could not start a node ({answer}): a fresh interpreter instead"
            )
            return self._fallback.start(argv, log, env, module)
        return ForkedProcess(int(answer["pid"]), self)

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            code = self._exits.get(pid)
        if code is None and not self._reader.is_alive() and _ended(pid):
            # The server is gone (killed), so nobody reports this child: it ended, status unknown.
            _logger.warning(f"node process {pid} ended after the prefork server: its exit status is unknown")
            with self._changed:
                code = self._exits.setdefault(pid, UNKNOWN_EXIT)
        return code

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._changed:
                if pid not in self._exits and self._reader.is_alive():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is None or left > 0:
                        self._changed.wait(min(left, 1.0) if left is not None else 1.0)
            code = self.exit_code(pid)
            if code is not None or (deadline is not None and time.monotonic() >= deadline):
                return code
            if not self._reader.is_alive():
                time.sleep(0.05)  # no server to wake us: look at the process itself

    def close(self) -> None:
        """Stop the server (it stops any child still running) and wait for it."""
        with contextlib.suppress(OSError):
            self._requests.close()
        try:
            self._server.wait(timeout=2 * _STOP_GRACE_S + 5.0)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait(timeout=10.0)
        self._reader.join(timeout=5.0)

    def _answer(self, timeout_s: float, request: int | None = None) -> dict[str, Any]:
        """The server's next answer (to ``request``: earlier ones, answered too late, are dropped)."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = self._answers.get(timeout=left)
            except queue.Empty:
                break
            if request is None or answer.get("id", request) == request:
                return answer
        return {"error": f"no answer in {timeout_s:.0f} s"}

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "exit" in message:
                with self._changed:
                    self._exits[int(message["exit"])] = int(message["code"])
                    self._changed.notify_all()
            else:
                self._answers.put(message)
        with self._changed:  # the server is gone: waiters must not wait for it
            self._changed.notify_all()
        self._answers.put({"error": "the prefork server exited"})


def launcher(server_log: Path) -> Launcher:
    """A :class:`ForkLauncher` where it works, else a :class:`SubprocessLauncher` (module docstring)."""
    if not sys.platform.startswith("linux") or os.environ.get("P2PFM_PREFORK", "1") == "0":
        return SubprocessLauncher()
    try:
        return ForkLauncher(server_log)
    except (OSError, RuntimeError) as exc:
        _logger.warning(f"starting every node in a fresh interpreter instead: {exc}")
        return SubprocessLauncher()


def _ended(pid: int) -> bool:
    """True when ``pid`` no longer runs: gone, or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


# ------------------------------------------------------------------ the server


def _serve(argv: Sequence[str]) -> int:
    """The prefork server's loop: preload, then fork on request and report exits (module docstring)."""
    for name in _preload(argv):
        importlib.import_module(name)
    # A Ctrl-C reaches the whole process group: the nodes stop themselves, and the server must
    # live on to reap them and report how they ended (it stops when the runner closes its stdin).
    # Blocked, not ignored: a child inherits the mask, and a Ctrl-C that comes before it has set
    # its handler waits for it instead of being lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    out = sys.stdout.buffer
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: set[int] = set()

    def say(message: Mapping[str, Any]) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})

    say({"state": _READY})
    pending = b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            reap()
        if 0 not in ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            answer = _spawn(line, (wake_r, wake_w))
            if "pid" in answer:
                children.add(answer["pid"])
            say(answer)
        reap()
    _stop_children(children, reap)
    return 0


def _preload(argv: Sequence[str]) -> Sequence[str]:
    """The modules to import first: ``--preload=a,b`` (empty: none), else PRELOAD."""
    for arg in argv:
        if arg.startswith("--preload="):
            return [name for name in arg.removeprefix("--preload=").split(",") if name]
    return PRELOAD


def _spawn(line: bytes, wake: tuple[int, int]) -> dict[str, Any]:
    """One request line -> the answer: the child's pid, or what went wrong (the runner falls back)."""
    request: Any = None
    try:
        request = json.loads(line)
        pid = _fork(request.get("module", "p2pfm"), request["argv"], request["log"], request["env"], wake)
    except Exception as exc:  # noqa: BLE001  reported to the runner
        return {"id": request.get("id") if isinstance(request, dict) else None, "error": repr(exc)}
    return {"id": request.get("id"), "pid": pid}


def _stop_children(children: set[int], reap: Any) -> None:
    """The runner is gone: SIGTERM what still runs, SIGKILL it after a grace period."""
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    while children and time.monotonic() < deadline:
        time.sleep(0.05)
        reap()
    for pid in list(children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while children:
        time.sleep(0.05)
        reap()


def _fork(module: str, argv: Sequence[str], log: str, env: Mapping[str, str], wake: tuple[int, int]) -> int:
    """Fork one child that runs ``python -m <module> <argv>``; returns its pid."""
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return pid
    code = 1
    try:  # the child: it never returns to the server's loop
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for fd in wake:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [sys.executable, *argv]  # as runpy would set it for ``python -m p2pfm``
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        atexit._run_exitfuncs()  # what an interpreter's exit runs (logging.shutdown and the like)
    except BaseException:  # noqa: BLE001  the child reports its own failure in its log
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
