"""Four CI jobs, one Modal app: cold starts and billed container-seconds per keep-alive strategy.

A 4-job matrix on the emulator: each job is a real pytest process (the plugin, the fake Modal
adapter) whose tests are separated by idle gaps longer than the scale-down window, started a
little apart as matrix jobs are. Side by side, in one run:

- `per-job ping` / `per-job autoscaler`: every job keeps the app warm on its own (the lease
  store switched off, as before leases): pings, or a pin that the first job to finish takes
  away from the others;
- `per-job ephemeral`: every job runs its own ephemeral app (its own container, stopped at
  the job's end);
- `shared leases` (autoscaler and ping): the jobs share one lease Dict: one pin (or one pinger)
  for all, the original settings restored by the last job, the idle tail parked.

Billed seconds run from the first boot until the last container is down (or stopped). Time is
scaled: 1 emulator second stands for 1 minute of a real deployment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from emulator import TESTS, EmulatorBehaviour, ModalEmulator

TESTS_PER_JOB = (2, 2, 3, 4)  # matrix jobs rarely take the same time
JOBS = len(TESTS_PER_JOB)
GAP = 6.0  # between a job's tests: longer than the scale-down window
WINDOW = 5.0  # scale-down window
COLD_START = 2.0
INTERVAL = 1.0  # keep_alive_interval (pings, lease heartbeats; TTL 3 s)
STAGGER = 0.5  # between job starts


def job_test(tests: int) -> str:
    """A job's test module: `tests` requests, `GAP` seconds apart."""
    head = "import time\n\n"
    return head + "\n".join(
        f"def test_{n}(openai_client, vllm_endpoint):\n"
        f"    time.sleep({GAP if n else 0})\n"
        "    openai_client.chat.completions.create(\n"
        '        model=vllm_endpoint.model, messages=[{"role": "user", "content": "hi"}]\n'
        "    )\n"
        for n in range(tests)
    )


def run(strategy: str) -> dict[str, Any]:
    """One matrix of `JOBS` jobs under `strategy`; cold starts, billed seconds, wall time."""
    keep_alive = "ping" if "ping" in strategy or "ephemeral" in strategy else "autoscaler"
    shared = strategy.startswith("shared")
    ephemeral = "ephemeral" in strategy
    servers = [_emulator() for _ in range(JOBS if ephemeral else 1)]
    with tempfile.TemporaryDirectory() as work:
        project = Path(work)
        started = time.monotonic()
        jobs = []
        for index in range(JOBS):
            server = servers[index if ephemeral else 0]
            project_dir = project / f"job{index}"
            project_dir.mkdir()
            (project_dir / "test_job.py").write_text(job_test(TESTS_PER_JOB[index]))
            (project_dir / "pyproject.toml").write_text(
                '[tool.modal-vllm.platforms.mod]\nkind = "modal"\napp = "my-app"\n'
                f'keep_alive = "{keep_alive}"\nkeep_alive_interval = {INTERVAL}\n'
            )
            env = {
                **os.environ,
                "PYTHONPATH": str(TESTS),
                "MODAL_VLLM_SDK_ADAPTER": "fake_modal:FakeModal",
                "FAKE_MODAL_URLS": json.dumps({"my-app/serve": server.root_url}),
                "FAKE_MODAL_STATE": str(project / "state.json"),
            }
            if not shared:
                env["FAKE_MODAL_FAIL"] = "leases"  # each job on its own, as before leases
            args = ["--vllm-platform=mod", "-q", "-p", "no:cacheprovider"]
            if ephemeral:
                args.append("--vllm-ephemeral")
            jobs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pytest", *args],
                    cwd=project_dir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
            time.sleep(STAGGER)
        outcomes = []
        for index, job in enumerate(jobs):
            job.communicate(timeout=300)
            outcomes.append(job.returncode)
            if ephemeral:
                servers[index].stop()  # the ephemeral app stops with its job
        wall = time.monotonic() - started
        _wait_down(servers)
    billed = sum(server.stats.container_seconds for server in servers)
    boots = sum(server.stats.cold_starts for server in servers) - len(servers)
    for server in servers:
        server.stop()
    return {
        "jobs_passed": sum(code == 0 for code in outcomes),
        "cold_starts": boots,
        "billed_s": round(billed, 1),
        "wall_s": round(wall, 1),
    }


def _emulator() -> ModalEmulator:
    server = ModalEmulator(
        behaviour=EmulatorBehaviour(
            cold_start=COLD_START, cold_style="hold", scaledown_window=WINDOW
        )
    ).start()
    server.scale_to_zero()  # asleep, as after idle: each matrix starts cold
    return server


def _wait_down(servers: list[ModalEmulator]) -> None:
    """Until every container is down (scaled to zero or stopped): the idle tail is billed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if all(server.state in ("down", "stopped") for server in servers):
            return
        time.sleep(0.1)


STRATEGIES = (
    "per-job autoscaler",
    "per-job ping",
    "per-job ephemeral",
    "shared leases (autoscaler)",
    "shared leases (ping)",
)


def main() -> dict[str, dict[str, Any]]:
    """Every strategy, one after the other, in one run."""
    return {strategy: run(strategy) for strategy in STRATEGIES}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
