"""Node processes forked from one interpreter that imported a node's code once.

A node process spent about 2.3 s importing torch and Butterfly before it did anything
(Intel Xeon, 2 cores): four started at once took 4.9 s to listen and 6.9 s to be a
healthy cluster, and a restarted node paid the import again. The launcher starts its
nodes from a fork server instead: one process per launching process, started with the
launcher's node environment (`CHILD_ENV`: the OpenMP runtime reads it once, when torch
loads it) and `PRELOAD` imported, which forks each node and runs `python -m <module>
<args>` in the fork as a fresh interpreter would. Only the first node waits for the
import; the tests' many clusters pay it once per test process.

Not multiprocessing's fork server: its children import the launching process's
`__main__` first (a test runner's, or the CLI's), where a node must run as though it
were the main program.

The server forks from a state that ran no torch operation, so no OpenMP pool exists to
be lost in a node; numpy's OpenBLAS thread is shut down around each fork by OpenBLAS.
It reaps its nodes and reports their exit codes (negative: the signal that ended one,
as `subprocess.Popen` says); the launcher signals them by PID. It exits when the
launching process closes its end (or dies); nodes still running then stay, as
`subprocess.Popen`'s children do, for their launcher to stop by PID.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import os
import runpy
import select
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import setproctitle

PRELOAD = ("butterfly.cli", "butterfly.node")
"""What `butterfly start` imports before it reads its config (an import the server cannot
do is left to each node)."""
LOST = 255
"""The exit code said of a node whose server died before reporting it (the node is gone,
but how it ended is not known)."""


class NodeProcess(Protocol):
    """What the launcher and the tests use of a node's process: `subprocess.Popen`, or a
    node forked by the fork server (`ForkedNode`)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def forkable(command: Sequence[str]) -> str | None:
    """The module `command` runs if it is `<this interpreter> -m <module> ...` (what the
    fork server runs), else None."""
    if len(command) >= 3 and command[0] == sys.executable and command[1] == "-m":
        return command[2]
    return None


class ForkServer:
    """The launching process's end: asks for forks, hears of exits (a reader thread)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        """`env`: the server's environment, and so every node's."""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from butterfly.cli.prefork import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(env),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to, self._from = self._proc.stdin, self._proc.stdout
        self._asking = threading.Lock()  # one fork asked for at a time
        self._state = threading.Condition()
        self._answer: dict[str, Any] | None = None
        self._exits: dict[int, int] = {}
        self._gone = False
        threading.Thread(target=self._read, name="fork server", daemon=True).start()

    def alive(self) -> bool:
        return self._proc.poll() is None and not self._gone

    def fork(self, module: str, args: Sequence[str], log: Path, cwd: Path) -> ForkedNode:
        request = {"module": module, "args": list(args), "log": str(log), "cwd": str(cwd)}
        with self._asking:
            self._to.write(json.dumps(request).encode() + b"\n")
            self._to.flush()
            with self._state:
                if not self._state.wait_for(lambda: self._answer is not None or self._gone, 60):
                    raise RuntimeError("the fork server did not answer within 60 s")
                answer, self._answer = self._answer, None
        if answer is None or "pid" not in answer:
            raise RuntimeError(f"the fork server could not start {module}: {answer}")
        return ForkedNode(self, int(answer["pid"]), [module, *args])

    def exit_code(self, pid: int) -> int | None:
        with self._state:
            if pid in self._exits:
                return self._exits[pid]
            if not self._gone or _running(pid):
                return None
            return LOST

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._state:
            self._state.wait_for(lambda: self.exit_code(pid) is not None, timeout)
        return self.exit_code(pid)

    def _read(self) -> None:
        try:
            for line in self._from:
                said = json.loads(line)
                with self._state:
                    if "exit" in said:
                        self._exits[int(said["exit"])] = int(said["code"])
                    else:
                        self._answer = said
                    self._state.notify_all()
        finally:
            with self._state:
                self._gone = True
                self._state.notify_all()


class ForkedNode:
    """A node forked by the fork server, used as a `subprocess.Popen` is."""

    def __init__(self, server: ForkServer, pid: int, args: list[str]) -> None:
        self._server, self._pid, self.args = server, pid, args

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._server.exit_code(self._pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait(self._pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_servers_lock = threading.Lock()


@functools.cache
def _servers() -> dict[tuple[tuple[str, str], ...], ForkServer]:
    """This process's fork servers, one per environment its nodes are given (a bench's
    A/B runs the nodes of another checkout by their `PYTHONPATH`, and a server keeps the
    code it imported): each is this process's for as long as it runs (it exits with it),
    shared by every cluster this process launches."""
    return {}


def fork_node(
    command: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path | None = None
) -> ForkedNode:
    """Run `command` (`forkable`) forked by this process's fork server for `env` (the
    whole environment the node runs with), its output appended to `log`."""
    module = forkable(command)
    if module is None:
        raise ValueError(f"not a `{sys.executable} -m module` command: {list(command)}")
    key = tuple(sorted(env.items()))
    with _servers_lock:
        server = _servers().get(key)
        if server is None or not server.alive():
            server = _servers()[key] = ForkServer(env)
    return server.fork(module, command[3:], log, cwd or Path.cwd())


def _running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# --- the server ------------------------------------------------------------------------


def serve() -> None:
    """Import `PRELOAD`, then fork a node for each request read from standard input and
    report each node's exit on standard output, until standard input closes."""
    requests, answers = os.dup(0), os.fdopen(os.dup(1), "wb", buffering=0)
    quiet = os.open(os.devnull, os.O_RDWR)
    os.dup2(quiet, 0)
    os.dup2(2, 1)  # a stray print here cannot break the answers
    os.close(quiet)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the nodes' (one group)
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    pending = b""
    while True:
        ready, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(answers)
        if requests in ready:
            data = os.read(requests, 1 << 16)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = _fork(json.loads(line), (requests, answers.fileno(), wake_r, wake_w))
                answers.write(json.dumps({"pid": pid}).encode() + b"\n")


def _reap(answers: IO[bytes]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        answers.write(json.dumps({"exit": pid, "code": code}).encode() + b"\n")


def _fork(request: dict[str, Any], server_fds: tuple[int, ...]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in server_fds:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        code = _run(request["module"], request["args"])
    finally:
        os._exit(code)


def _run(module: str, args: list[str]) -> int:
    """`python -m module args` in this process: its exit code, as the interpreter would
    give it (an unhandled KeyboardInterrupt ends it by SIGINT, as it ends Python). Its
    command line (`ps`, `pgrep -f`) is the one it would have had: an operator finds a
    node by its config file's path, and found none but the fork server's."""
    setproctitle.setproctitle(shlex.join([sys.executable, "-m", module, *args]))
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _finish()
    return code


def _finish() -> None:
    """What an interpreter does at its exit: the exit handlers, then the streams."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
