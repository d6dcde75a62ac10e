"""Many sessions, one Modal app: real pytest processes sharing the emulator through leases in the
fake adapter's file-backed Dict (the stand-in for a `modal.Dict`).

Each session's test asserts, from inside its own process, what must hold while it runs: the
app is pinned (`min_containers >= 1`) and its container is up. The test here orchestrates
start and end times with files, kills one session with SIGKILL, and checks what Modal would
be left with: one cold start in all, the original settings back, the idle tail parked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli
from fake_modal import read_dict
from modal_emulator import ModalEmulator

from pytest_modal_vllm.leases import PARKED_WINDOW

TESTS = Path(__file__).resolve().parent
INTERVAL = 1.0  # keep_alive_interval: the TTL is three of them
TIMEOUT = 90.0

SESSION_TEST = """
import os
import pathlib
import time

import httpx

def test_session(vllm_endpoint, openai_client):
    me = os.environ["SESSION_INDEX"]
    run_dir = pathlib.Path(os.environ["RUN_DIR"])
    checks = 0
    while True:  # at least one check before the orchestrator may release this session
        settings = httpx.get(vllm_endpoint.root_url + "/__modal/autoscaler").json()
        stats = httpx.get(vllm_endpoint.root_url + "/__modal/stats").json()
        if os.environ.get("EXPECT_PIN") == "1":
            assert settings["min_containers"] >= 1, settings
        assert stats["num_total_runners"] == 1, stats
        openai_client.chat.completions.create(
            model=vllm_endpoint.model, messages=[{"role": "user", "content": f"s{me}"}]
        )
        checks += 1
        if checks == 1:
            (run_dir / f"running-{me}").touch()
        if (run_dir / f"release-{me}").exists():
            break
        time.sleep(0.2)
"""


class Sessions:
    """Starts pytest processes against one modal platform and steers them with files."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project, self.env = project, env
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, index: int) -> None:
        env = {**self.env, "SESSION_INDEX": str(index)}
        self.processes[index] = subprocess.Popen(
            [sys.executable, "-m", "pytest", "--vllm-platform=mod", "-p", "no:cacheprovider",
             "-p", "no:asyncio", "-p", "no:langsmith_plugin", "-p", "no:anyio", "-q"],
            cwd=self.project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_running(self, index: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        marker = self.project / f"running-{index}"
        while not marker.exists():
            process = self.processes[index]
            if process.poll() is not None or time.monotonic() > deadline:
                out = process.communicate(timeout=10)[0] if process.poll() is not None else b""
                pytest.fail(f"session {index} did not start its test:\n{out.decode()}")
            time.sleep(0.05)

    def release(self, index: int) -> str:
        (self.project / f"release-{index}").touch()
        out, _ = self.processes[index].communicate(timeout=TIMEOUT)
        assert self.processes[index].returncode == 0, out.decode()
        return out.decode()

    def kill_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture
def shared_app(
    pytester: pytest.Pytester,
    endpoint_server: Callable[..., ModalEmulator],
    write_platforms: Callable[..., None],
    tmp_path: Path,
) -> Any:
    """Factory: the emulator of `my-app/serve` (scaled to zero, deployed window 30 s), the
    project, the environment every session and `modal-vllm` command shares."""
    made: list[Sessions] = []

    def make(**platform: Any) -> tuple[ModalEmulator, Sessions]:
        server = endpoint_server(cold_start=1.0, cold_style="hold", scaledown_window=30.0)
        server.scale_to_zero()
        fields = {"kind": "modal", "app": "my-app", "keep_alive_interval": INTERVAL, **platform}
        write_platforms({"mod": fields})
        pytester.makepyfile(test_session=SESSION_TEST)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "MODAL_VLLM_SDK_ADAPTER": "fake_modal:FakeModal",
            "FAKE_MODAL_URLS": json.dumps({"my-app/serve": server.root_url}),
            "FAKE_MODAL_STATE": str(tmp_path / "state.json"),
            "RUN_DIR": str(pytester.path),
            "EXPECT_PIN": "1" if platform.get("keep_alive") == "autoscaler" else "0",
        }
        sessions = Sessions(pytester.path, env)
        made.append(sessions)
        return server, sessions

    yield make
    for sessions in made:
        sessions.kill_all()


def leases_of(tmp_path: Path) -> list[str]:
    return [key for key in read_dict(tmp_path / "state.json", "my-app") if key.startswith("lease")]


def test_six_sessions_share_one_pin_and_one_cold_start_even_with_one_killed(
    shared_app: Any, tmp_path: Path
) -> None:
    server, sessions = shared_app(keep_alive="autoscaler")
    boots = server.stats.cold_starts
    sessions.start(0)
    sessions.wait_running(0)
    for index in range(1, 6):  # staggered starts
        sessions.start(index)
        time.sleep(0.3)
    for index in range(1, 6):
        sessions.wait_running(index)
    assert len(leases_of(tmp_path)) == 6
    for index in range(5):  # staggered ends: each finds others live and leaves the pin
        output = sessions.release(index)
        assert "1 passed" in output
        assert server.autoscaler()["min_containers"] == 1
    # The last session left is killed: no cleanup of its own.
    sessions.processes[5].send_signal(signal.SIGKILL)
    sessions.processes[5].communicate(timeout=TIMEOUT)
    assert server.autoscaler()["min_containers"] == 1  # its lease holds the pin until its TTL
    assert len(leases_of(tmp_path)) == 1

    time.sleep(3 * INTERVAL + 0.5)  # past the TTL; `status` is the next to look
    status = run_cli(sessions.project, "status", "mod", env=sessions.env)
    assert status.returncode == 0, status.stderr
    assert "cleared the lease of" in status.stdout
    assert "restored min_containers to 0" in status.stdout
    assert "0 live" in status.stdout

    assert server.autoscaler()["min_containers"] == 0  # the original value is back
    assert server.autoscaler()["scaledown_window"] == PARKED_WINDOW
    assert server.stats.cold_starts - boots == 1  # one cold start for six sessions
    assert leases_of(tmp_path) == []


def test_the_idle_tail_is_parked_and_the_next_session_finds_the_window_restored(
    shared_app: Any, tmp_path: Path
) -> None:
    server, sessions = shared_app()  # keep_alive: ping (the modal default)
    sessions.start(0)
    sessions.wait_running(0)
    output = sessions.release(0)
    assert f"scale-down window {PARKED_WINDOW}s until the next session (was 30s)" in output
    # The container goes within seconds of the session's end, not after the 30 s window.
    deadline = time.monotonic() + 15
    while not server.stats.snapshot()["scale_downs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    (idle,) = server.stats.snapshot()["scale_downs"]
    assert idle <= PARKED_WINDOW + 3.0

    sessions.start(1)
    sessions.wait_running(1)
    assert server.autoscaler()["scaledown_window"] == 30  # restored for the session's run
    sessions.release(1)
    assert server.autoscaler()["scaledown_window"] == PARKED_WINDOW


def test_a_lease_store_that_cannot_be_reached_falls_back_to_the_session_alone(
    shared_app: Any, tmp_path: Path
) -> None:
    server, sessions = shared_app(keep_alive="autoscaler")
    sessions.env["FAKE_MODAL_FAIL"] = "leases"
    sessions.start(0)
    sessions.wait_running(0)
    output = sessions.release(0)
    assert "WARNING: the shared lease cannot be used (fake Modal: leases failed)" in output
    assert "1 passed" in output
    assert server.autoscaler()["min_containers"] == 0  # the session's own pin, restored
    assert leases_of(tmp_path) == []
