"""The example suite live on the real `local` model versus replayed from cassettes, in one run.

In a copy of examples/ (without its cassettes): a live run, a recording run, then a replay
(`--record-mode=none`: no server starts). Reported: wall time of each, and the seconds a
model server ran (what a GPU on Modal would bill, before its cold start and idle tail): the
session's time live, nothing on replay.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def pytest_run(cwd: Path, *args: str) -> dict[str, Any]:
    """One `pytest --vllm-platform=local ARGS` in `cwd`: wall time, the report row, outcome."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--vllm-platform=local", "-q", "-p", "no:cacheprovider",
         "--vllm-report=report.json", *args],
        cwd=cwd, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    wall = time.monotonic() - started
    (row,) = json.loads((cwd / "report.json").read_text())["platforms"]
    return {"wall_s": round(wall, 2), "ok": result.returncode == 0, "row": row,
            "summary": result.stdout.strip().splitlines()[-1]}  # fmt: skip


def main() -> dict[str, Any]:
    """Live, record, replay; the ratio of live to replay wall time."""
    with tempfile.TemporaryDirectory() as work:
        copy = Path(work) / "examples"
        shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("cassettes", "__pycache__"))
        live = pytest_run(copy)
        recorded = pytest_run(copy, "--record-mode=once")
        replayed = pytest_run(copy, "--record-mode=none")
    return {
        "live_wall_s": live["wall_s"],
        "record_wall_s": recorded["wall_s"],
        "replay_wall_s": replayed["wall_s"],
        # The server ran from the wake to the end of the session; replays start none.
        "live_server_s": round(live["wall_s"], 1),
        "replay_server_s": 0.0,
        "replayed_requests": replayed["row"]["replayed"],
        "requests": replayed["row"]["requests"],
        "ratio": round(live["wall_s"] / replayed["wall_s"], 1),
        "same_outcome": live["summary"].split(" in ")[0] == replayed["summary"].split(" in ")[0],
        "all_ok": live["ok"] and recorded["ok"] and replayed["ok"],
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
