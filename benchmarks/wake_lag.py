"""Wake-detection lag: from the endpoint becoming ready to the plugin (or a poller) noticing.

For each server style (refuse like vLLM binding late, 503 like Modal `@app.server`, hold like a
Modal web function), the same cold start is measured with:
- the plugin's `Waker` (in-process), and
- fixed-interval pollers as common helpers do it: 0.5 s (vLLM's test helper), 1 s
  (testcontainers), 5 s (hand-written warm-up scripts),
and, end to end, the time from "ready" to the first test starting in a real `pytest` run.
The endpoint's ready time is `ModalEmulator.stats.ready_at` (CLOCK_MONOTONIC, shared by all
processes on Linux), so the lag is measured, not estimated.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from emulator import EmulatorBehaviour, ModalEmulator

from pytest_modal_vllm.wake import Waker, WakeRequest

STYLES = ("refuse", "503", "hold")
ROUNDS = 5
POLL_INTERVALS = (0.5, 1.0, 5.0)


def cold_start() -> float:
    # A random phase against every poller's interval, as in real life.
    return 1.0 + random.random() * 1.0


def plugin_lag(style: str) -> float:
    with ModalEmulator(
        behaviour=EmulatorBehaviour(cold_start=cold_start(), cold_style=style)
    ) as server:
        Waker(WakeRequest("bench", server.base_url, timeout=60)).run()
        noticed = time.monotonic()
        assert server.stats.ready_at is not None
        return noticed - server.stats.ready_at


def poller_lag(style: str, interval: float) -> float:
    with ModalEmulator(
        behaviour=EmulatorBehaviour(cold_start=cold_start(), cold_style=style)
    ) as server:
        while True:
            try:
                # A poller with a short per-request timeout, as such helpers use.
                if httpx.get(f"{server.root_url}/health", timeout=interval).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(interval)
        noticed = time.monotonic()
        assert server.stats.ready_at is not None
        return noticed - server.stats.ready_at


FIRST_TEST = """
import time, pathlib
def test_first(vllm_endpoint):
    pathlib.Path("first_test_at").write_text(repr(time.monotonic()))
"""


def first_test_lag(style: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "test_first.py").write_text(FIRST_TEST)
        with ModalEmulator(behaviour=EmulatorBehaviour(cold_start=3.0, cold_style=style)) as server:
            (root / "pyproject.toml").write_text(
                f'[tool.modal-vllm.platforms.bench]\nkind = "url"\nbase_url = "{server.base_url}"\n'
            )
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "--vllm-platform=bench",
                ],
                cwd=root,
                check=True,
                capture_output=True,
            )
            started = float((root / "first_test_at").read_text())
            assert server.stats.ready_at is not None
            return started - server.stats.ready_at


def main() -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for style in STYLES:
        row = {"plugin": statistics.median(plugin_lag(style) for _ in range(ROUNDS))}
        for interval in POLL_INTERVALS:
            rounds = ROUNDS if interval < 5 else 2
            row[f"poll {interval:g}s"] = statistics.median(
                poller_lag(style, interval) for _ in range(rounds)
            )
        row["plugin ready->first test"] = statistics.median(first_test_lag(style) for _ in range(3))
        results[style] = {k: round(v, 3) for k, v in row.items()}
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
