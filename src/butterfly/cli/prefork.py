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
launching process closes its end or dies, and its nodes die with it (SIGKILL, a
parent-death signal): a `cluster up` killed with SIGKILL left its nodes running, and a
node whose server is gone could no longer be told from a process given its PID later.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import importlib
import itertools
import json
import os
import runpy
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import setproctitle

PRELOAD = ("butterfly.cli", "butterfly.node")
"""What `butterfly start` imports before it reads its config (an import the server cannot
do is left to each node)."""
LOST = 255
"""The exit code said of a node whose server died before reporting it: the node dies with
its server (a parent-death signal), so its PID is never looked at again (the kernel may
give it to another process), but how it ended is not known."""


PR_SET_PDEATHSIG = 1  # prctl(2)


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

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def forkable(command: Sequence[str]) -> str | None:
    """The module `command` runs if it is `<this interpreter> -m <module> ...` (what the
    fork server runs), else None."""
    if len(command) >= 3 and command[0] == sys.executable and command[1] == "-m":
        return command[2]
    return None


class CannotFork(RuntimeError):
    """The fork server could not start a node (it exited, did not answer, or its fork
    failed): the launcher starts that node anew."""


class _Stale(CannotFork):
    """The server's code changed on disk since it imported it: it forks no more."""


START_VARIABLES = (
    "PYTHON",
    "LD_",
    "MALLOC_",
    "GLIBC_",
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "TORCH",
    "PYTORCH",
)
"""Prefixes of the environment variables read when an interpreter and its libraries start
(the code a server imports, its OpenMP runtime): nodes given other values need a server
started with them. The others reach a node as its own environment: keyed on the whole
environment, pytest's `PYTEST_CURRENT_TEST` gave every test its own server."""
ANSWER_S = 60.0
"""How long the launcher waits for the server to say a node's PID."""


class ForkServer:
    """The launching process's end: asks for forks, hears of exits (a reader thread).

    Each fork asked for has a number, its answer names it, and a node is known by it:
    a PID the kernel gives again to a later node is that node's, not the exited one's."""

    def __init__(self, env: Mapping[str, str]) -> None:
        """`env`: the server's environment (`START_VARIABLES` are the nodes' too)."""
        # this file run by path: the nodes' code is the one `env` finds (a bench's A/B gives
        # another checkout's by PYTHONPATH, which may have no fork server of its own)
        serve = f"import runpy; runpy.run_path({__file__!r}, run_name='prefork')['serve']()"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", serve],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(env),
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to, self._from = self._proc.stdin, self._proc.stdout
        self._state = threading.Condition()
        self._asked = itertools.count(1)
        self._answers: dict[int, dict[str, Any]] = {}
        self._abandoned: set[int] = set()  # asked for, then not waited for: killed once told
        self._pids: dict[int, int] = {}  # a PID's node, the last one given it
        self._exits: dict[int, int] = {}  # a node's exit code, by its number
        self._gone = False
        threading.Thread(target=self._read, name="fork server", daemon=True).start()

    def alive(self) -> bool:
        """Until its reader has heard the last it said (a server seen exited while its
        last exits were still in the pipe lost them, a review)."""
        return not self._gone

    def fork(
        self, module: str, args: Sequence[str], log: Path, cwd: Path, env: Mapping[str, str]
    ) -> ForkedNode:
        number = next(self._asked)
        request = {
            "id": number,
            "module": module,
            "args": list(args),
            "log": str(log),
            "cwd": str(cwd),
            "env": dict(env),
        }
        answer: dict[str, Any] | None = None
        try:
            with self._state:
                self._to.write(json.dumps(request).encode() + b"\n")
                self._to.flush()
                self._state.wait_for(lambda: number in self._answers or self._gone, ANSWER_S)
                answer = self._answers.pop(number, None)
        except (OSError, ValueError) as e:  # its pipe broken or closed: it exited
            raise CannotFork(f"the fork server is gone ({e})") from e
        finally:
            if answer is None:  # a timeout, an interrupt (Ctrl-C) or the server's death
                self._abandon(number)
        if answer is None and self._gone:
            raise CannotFork(f"the fork server exited before it started {module}")
        if answer is None:
            raise CannotFork(f"the fork server did not start {module} within {ANSWER_S:.0f} s")
        if answer.get("stale"):
            raise _Stale("the fork server's code changed on disk")
        if "pid" not in answer:
            raise CannotFork(f"the fork server could not start {module}: {answer.get('error')}")
        return ForkedNode(self, number, int(answer["pid"]), [module, *args])

    def _abandon(self, number: int) -> None:
        """A node asked for and not waited for is killed once its PID is said (as a node
        `cluster up` started while Ctrl-C went out would have run on, holding its port)."""
        with self._state:
            late = self._answers.pop(number, None)
            if late is None:
                self._abandoned.add(number)
            elif "pid" in late:
                _kill(int(late["pid"]))

    def exit_code(self, number: int) -> int | None:
        with self._state:
            return self._exits.get(number)

    def wait(self, number: int, timeout: float | None) -> int | None:
        """The node's exit code once it exits, or None after `timeout`."""
        with self._state:
            self._state.wait_for(lambda: number in self._exits, timeout)
            return self._exits.get(number)

    def _read(self) -> None:
        try:
            for line in self._from:
                said = json.loads(line)
                with self._state:
                    if "exit" in said:  # said before any fork that is given its PID again
                        number = self._pids.pop(int(said["exit"]), None)
                        if number is not None:
                            self._exits[number] = int(said["code"])
                    else:
                        number = int(said["id"])
                        if "pid" in said:
                            self._pids[int(said["pid"])] = number
                        if number in self._abandoned:
                            self._abandoned.discard(number)
                            if "pid" in said:
                                _kill(int(said["pid"]))
                        else:
                            self._answers[number] = said
                    self._state.notify_all()
        finally:
            with self._state:
                self._gone = True
                for number in self._pids.values():  # killed with it: `LOST`
                    self._exits.setdefault(number, LOST)
                self._pids.clear()
                self._state.notify_all()
            for pipe in (self._to, self._from):
                with contextlib.suppress(OSError):
                    pipe.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)


class ForkedNode:
    """A node forked by the fork server, used as a `subprocess.Popen` is."""

    def __init__(self, server: ForkServer, number: int, pid: int, args: list[str]) -> None:
        self._server, self._number, self._pid, self.args = server, number, pid, args

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._server.exit_code(self._number)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait(self._number, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the node unless it is known to have exited (its PID may be another's
        by then, as after `subprocess.Popen` reaped it)."""
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
    """This process's fork servers, one per value of the `START_VARIABLES` its nodes are
    given (a bench's A/B runs another checkout's nodes by their `PYTHONPATH`, and a server
    keeps the code it imported): each is this process's for as long as it runs (it exits
    with it), shared by every cluster this process launches."""
    return {}


def fork_node(
    command: Sequence[str], log: Path, env: Mapping[str, str], cwd: Path | None = None
) -> ForkedNode:
    """Run `command` (`forkable`) forked by this process's fork server for `env` (the
    whole environment the node runs with), its output appended to `log`. `CannotFork` if
    the server cannot (a server whose code changed on disk since it imported it is
    replaced first: a node restarted by a long-running `cluster up` runs the code there)."""
    module = forkable(command)
    if module is None:
        raise ValueError(f"not a `{sys.executable} -m module` command: {list(command)}")
    with open(log, "ab"):  # a log it cannot write is the launcher's error, as with Popen
        pass
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(START_VARIABLES)))
    for _ in range(2):
        with _servers_lock:
            server = _servers().get(key)
            if server is None or not server.alive():
                server = _servers()[key] = ForkServer(env)
        try:
            return server.fork(module, command[3:], log, cwd or Path.cwd(), env)
        except _Stale:
            with _servers_lock:
                _servers().pop(key, None)
    raise CannotFork("the fork server's code changed on disk again as it started")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- the server ------------------------------------------------------------------------


def serve() -> None:
    """Import `PRELOAD`, then fork a node for each request read from standard input and
    report each node's exit on standard output, until standard input closes (its nodes
    die with it: `_fork`). A request it cannot carry out is answered with the error (it
    keeps serving); once a file of the code it imported has changed, it answers `stale`
    (the launcher starts another), reports its nodes' exits, and exits after the last."""
    requests, answers = os.dup(0), os.fdopen(os.dup(1), "wb", buffering=0)
    quiet = os.open(os.devnull, os.O_RDWR)
    os.dup2(quiet, 0)
    os.dup2(2, 1)  # a stray print here cannot break the answers
    os.close(quiet)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the nodes' (one group)
    started = time.time()
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    sources, imported = _sources(), time.time()
    # a file edited while it imported may be the old code here (a future time, a clock's
    # skew or an archive's, is no edit: every server would be stale from the start)
    stale = any(started <= mtime <= imported for mtime in sources.values())
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    pending = b""
    while not (stale and not children):
        ready, _, _ = select.select([requests, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            children -= _reap(answers)
        if requests not in ready:
            continue
        data = os.read(requests, 1 << 16)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            said: dict[str, Any] = {}
            try:
                request = json.loads(line)
                said["id"] = request["id"]
                stale = stale or _sources() != sources
                if stale:  # its nodes still get their exits said
                    said["stale"] = True
                else:
                    said["pid"] = _fork(request, (requests, answers.fileno(), wake_r, wake_w))
                    children.add(said["pid"])
            except Exception as e:  # EAGAIN, ENOMEM, a request it cannot read: not fatal
                said["error"] = f"{type(e).__name__}: {e}"
                print(f"fork server: {said['error']}", file=sys.stderr)
            if "id" in said:
                answers.write(json.dumps(said).encode() + b"\n")


def _sources() -> dict[str, float]:
    """The modification times of the files of Butterfly's code this process imported."""
    package = str(Path(importlib.import_module("butterfly").__file__ or "").parent) + os.sep
    times = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(package):
            with contextlib.suppress(OSError):
                times[path] = os.stat(path).st_mtime
    return times


def _reap(answers: IO[bytes]) -> set[int]:
    """Report every node that exited; their PIDs."""
    reaped: set[int] = set()
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)
        code = os.waitstatus_to_exitcode(status)
        answers.write(json.dumps({"exit": pid, "code": code}).encode() + b"\n")


def _fork(request: dict[str, Any], server_fds: tuple[int, ...]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    server = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        # dies with the server: its exit code could no longer be told, and its PID, given
        # to another process later, would be signalled as the node's (a review)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server:
            os._exit(LOST)  # it died as it forked
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
        code = _run(request["module"], request["args"], request["env"])
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _run(module: str, args: list[str], env: dict[str, str]) -> int:
    """`python -m module args` in this process: its exit code, as the interpreter would
    give it (an unhandled KeyboardInterrupt ends it by SIGINT, as it ends Python). Its
    command line (`ps`, `pgrep -f`) is the one it would have had: an operator finds a
    node by its config file's path, and found none but the fork server's (its name, in
    `ps -C` and `pidof`, stays the interpreter's; `/proc/<pid>/environ` is overwritten
    by the longer command line)."""
    setproctitle.setproctitle(shlex.join([sys.executable, "-m", module, *args]))
    setproctitle.setthreadtitle(Path(sys.executable).name)
    os.environ.clear()  # after the title, which takes the original environment's memory
    os.environ.update(env)
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
        return 128 + signal.SIGINT  # SIGINT blocked: as a shell reports it
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
