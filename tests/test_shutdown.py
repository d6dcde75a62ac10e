"""Clean shutdown: SIGINT and SIGTERM during the wake, during tests and during teardown.

A `process` platform (the stub server as a child process, tagged with a unique model name)
runs under a real `pytest` subprocess; the test signals that subprocess at the chosen moment
and then looks at the process table (/proc), not at the plugin's own word, for leftovers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import processes_with, stub_command

PHASES = ("wake", "test", "teardown")
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signame", SIGNALS)
@pytest.mark.parametrize("phase", PHASES)
def test_signal_leaves_nothing_running(pytester, write_platforms, tmp_path, phase, signame):
    marker = f"marker-{uuid.uuid4().hex[:12]}"
    cold = 60 if phase == "wake" else 0
    write_platforms(
        {
            "p": {
                "kind": "process",
                "model": marker,
                "command": stub_command("--cold-start", str(cold), "--cold-style", "refuse"),
                "keep_alive": "ping",
                "keep_alive_interval": 0.2,
            }
        }
    )
    started = tmp_path / "in-test"
    tearing = tmp_path / "in-teardown"
    pytester.makeconftest(
        f"""
        import pathlib, time, pytest

        @pytest.fixture(scope="session")
        def slow_teardown():
            yield
            if {phase!r} == "teardown":
                pathlib.Path({str(tearing)!r}).touch()
                time.sleep(60)
        """
    )
    pytester.makepyfile(
        f"""
        import pathlib, time

        def test_x(openai_client, vllm_endpoint, slow_teardown):
            openai_client.models.list()
            if {phase!r} == "test":
                pathlib.Path({str(started)!r}).touch()
                time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:asyncio",
            "-p",
            "no:cacheprovider",
            "--vllm-platform=p",
            "-s",
        ],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert wait_for(lambda: bool(processes_with(marker))), "the server never started"
        moment = {"wake": lambda: True, "test": started.exists, "teardown": tearing.exists}[phase]
        assert wait_for(moment), f"never reached the {phase} phase"
        if phase == "wake":
            time.sleep(0.5)  # well inside the 60 s cold start
        process.send_signal(SIGNALS[signame])
        output, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output.decode(errors="replace")
    assert process.returncode != 0
    assert "INTERNALERROR" not in text
    # Nothing the plugin started outlives the session: the server process is gone.
    assert wait_for(lambda: not processes_with(marker), timeout=5), text[-2000:]
