"""A node asked to stop ends by its deadline even when its own work will not finish
(`wiring.process.run_until_signalled`): a hung shutdown must not outlive the stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

HANGS_ON_STOP = textwrap.dedent(
    """
    import asyncio, logging, sys
    from butterfly.wiring.process import end_process, run_until_signalled

    logging.basicConfig(stream=sys.stderr)

    async def main(stop: asyncio.Event) -> None:
        print("ready", flush=True)
        await stop.wait()
        while True:  # a shutdown stuck on work that never ends, holding the loop too
            await asyncio.sleep(0)
            __import__("time").sleep(0.05)

    run_until_signalled(main, deadline_s=0.5)
    end_process(3)  # never reached: the deadline ends the process first
    """
)


def test_a_stop_that_hangs_ends_the_process_at_its_deadline(tmp_path: Path) -> None:
    script = tmp_path / "hangs.py"
    script.write_text(HANGS_ON_STOP)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
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
    assert code == 0, err
    assert "ending the process" in err and "Thread" in err  # logged, with the stacks
