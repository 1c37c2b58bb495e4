"""A node asked to stop ends by its deadline even when its own work will not finish
(`wiring.process.run_until_signalled`): a hung shutdown must not outlive the stop, and
says what it was waiting for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

HANGS_ON_STOP = textwrap.dedent(
    """
    import asyncio, logging, sys, time
    from butterfly.wiring.process import end_process, run_until_signalled

    logging.basicConfig(stream=sys.stderr)

    async def cancelled_work_that_never_ends() -> None:
        while True:  # swallows its cancellation, as a hung shutdown would
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def main(stop: asyncio.Event) -> None:
        work = asyncio.create_task(cancelled_work_that_never_ends())
        print("ready", flush=True)
        await stop.wait()
        work.cancel()
        await work

    run_until_signalled(main, deadline_s=float(sys.argv[1]))
    end_process(3)  # never reached: the deadline ends the process first
    """
)
BLOCKS_ITS_LOOP = HANGS_ON_STOP.replace("await work", "time.sleep(3600)")


def stop_and_wait(tmp_path: Path, script: str) -> tuple[int, str]:
    """Run `script` with a 0.5 s deadline, SIGTERM it once ready: its exit code and stderr."""
    path = tmp_path / "hangs.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(path), "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return code, err


def test_a_stop_that_hangs_ends_the_process_and_names_what_it_waited_for(
    tmp_path: Path,
) -> None:
    code, err = stop_and_wait(tmp_path, HANGS_ON_STOP)
    assert code == 0, err
    assert "ending the process" in err
    assert "cancelled_work_that_never_ends" in err  # the asyncio task's stack


def test_a_stop_whose_event_loop_is_blocked_ends_the_process_from_a_thread(
    tmp_path: Path,
) -> None:
    code, err = stop_and_wait(tmp_path, BLOCKS_ITS_LOOP)
    assert code == 0, err
    assert "its event loop blocked" in err and "Thread" in err  # every thread's stack
