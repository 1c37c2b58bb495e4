"""Loading progress (reported layer by layer, drawn only on a terminal) and
`butterfly status --watch` (redraws until Ctrl-C, which exits 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from butterfly.cli.status import table
from butterfly.runtime.loader import load_stage, model_args
from butterfly.runtime.progress import bars, quiet, wanted
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.model import LayerRange
from tests.http_util import serving

pytestmark = pytest.mark.timeout(60)


def test_a_stage_reports_every_tensor_read_and_every_layer_packed(tiny_model: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    reader = CheckpointReader(tiny_model, progress=lambda *r: seen.append(r))
    family, args = model_args(tiny_model)
    layers = LayerRange(1, 3)
    family.load_stage(reader, args, layers)
    reads = [(done, total) for phase, done, total in seen if phase == "read"]
    packs = [done for phase, done, total in seen if phase == "pack"]
    assert reads[-1] == (len(reader.names_read), len(reader.names_read))
    assert [done for done, _ in reads] == list(range(1, len(reads) + 1))
    assert packs == list(range(len(layers)))  # before each layer: how many are done
    assert seen.index(("pack", 0, len(layers))) > seen.index(("read", *reads[-1]))


def test_bars_only_on_a_terminal_unless_asked() -> None:
    assert not wanted(None)  # pytest's stderr is no terminal
    assert wanted(True) and not wanted(False)
    with bars("layers [0, 2)", None) as report:
        assert report is quiet


def test_asked_for_bars_a_load_gives_the_same_stage(tiny_model: Path) -> None:
    shown = load_stage(tiny_model, LayerRange(0, 2), progress=True)
    plain = load_stage(tiny_model, LayerRange(0, 2), progress=False)
    assert shown.layers == plain.layers == LayerRange(0, 2)


class _Health(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        _Health.hits += 1
        body = json.dumps(
            {
                "healthy": True,
                "nodes": [{"id": 0, "address": "127.0.0.1:9000", "status": "healthy"}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    with serving(_Health) as url:
        yield url


def _ctrl_c_as_a_terminal_gives_it() -> None:
    """In the child before exec: SIGINT delivered and handled by default, as a shell in a
    terminal starts a command. A process inherits an ignored or blocked SIGINT, and a
    Python started so never raises KeyboardInterrupt: twice under pytest-xdist the
    child slept on in its loop after the test's SIGINT."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    """The process's blocked, ignored and caught signal masks (/proc), for a failure."""
    with open(f"/proc/{pid}/status") as status:
        return ", ".join(
            line.strip().replace("\t", " ")
            for line in status
            if line.startswith(("SigBlk", "SigIgn", "SigCgt"))
        )


def test_status_watch_redraws_until_ctrl_c_and_exits_0(gateway: str) -> None:
    _Health.hits = 0
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "PYTHONFAULTHANDLER": "1",  # SIGABRT prints every thread's stack: see below
    }
    cmd = [sys.executable, "-m", "butterfly", "status", "--url", gateway, "--watch"]
    # the context closes the pipes whatever happens: left open, they end up in a later
    # test's unraisable-exception check (a CI run saw exactly that)
    with subprocess.Popen(
        [*cmd, "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_ctrl_c_as_a_terminal_gives_it,
    ) as proc:
        try:
            for _ in range(300):  # bounded: until it has redrawn twice after the first frame
                if _Health.hits >= 3 or proc.poll() is not None:
                    break
                time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()
            assert _Health.hits >= 3
            signals = _signal_state(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                out, errors = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                # seen twice under xdist, sleeping in its loop: say how it took signals
                proc.send_signal(signal.SIGABRT)
                _, errors = proc.communicate(timeout=10)
                stacks = errors.decode()[-6000:]
                pytest.fail(f"Ctrl-C did not end it in 30 s ({signals}); its stacks:\n{stacks}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, errors
    assert b"127.0.0.1:9000" in out and b"Traceback" not in errors


def test_status_watch_interval_is_bounded(gateway: str) -> None:
    from typer.testing import CliRunner

    from butterfly.cli import app

    result = CliRunner().invoke(app, ["status", "--url", gateway, "--watch", "--interval", "0"])
    assert result.exit_code == 2 and "interval" in result.output


class _Gateways(BaseHTTPRequestHandler):
    """A standby answering 503 that names the acting gateway (`acting`), and that
    acting gateway answering with its nodes: both served here, told apart by port."""

    acting = ""

    def do_GET(self) -> None:
        me = f"http://127.0.0.1:{self.server.server_address[1]}"
        if me == _Gateways.acting:
            status, body = 200, {"healthy": True, "nodes": [{"id": 7, "address": "acting:1"}]}
        else:
            gateways = [
                {"node": 1, "url": me, "acting": False},
                {"node": 0, "url": _Gateways.acting, "acting": True},
            ]
            status, body = 503, {"healthy": False, "nodes": [], "gateways": gateways}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_status_through_a_standby_names_the_gateway_whose_data_it_shows() -> None:
    from typer.testing import CliRunner

    from butterfly.cli import app

    with serving(_Gateways) as standby, serving(_Gateways) as acting:
        _Gateways.acting = acting
        result = CliRunner().invoke(
            app, ["status", "--url", f"{standby},{acting}"], env={"COLUMNS": "200"}
        )
    assert result.exit_code == 0, result.output
    assert "acting:1" in result.output  # the acting gateway's nodes...
    assert f"Butterfly at {acting}" in result.output  # ...under its own address
    assert standby not in result.output


def test_status_says_degraded_while_the_plan_serves_without_a_failed_member() -> None:
    """`healthy` stays true once recovery planned around a failed node; the title said
    "healthy" above a `failed` row."""
    nodes = [{"id": 0, "status": "healthy"}, {"id": 3, "status": "failed"}]
    assert table("u", {"healthy": True, "nodes": nodes}).title == (
        "Butterfly at u: healthy, degraded (node 3 not healthy)"
    )
    assert table("u", {"healthy": True, "nodes": nodes[:1]}).title == "Butterfly at u: healthy"
    assert table("u", {"healthy": False, "nodes": nodes}).title == "Butterfly at u: UNHEALTHY"
