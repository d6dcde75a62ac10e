"""The example agent's suite (examples/) runs green on `stub-agent` and on the real `local` model.

Run as users run it: `pytest --vllm-platform=NAME` inside examples/, in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import netns_prefix, outcomes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_examples(
    platform: str, *args: str, cwd: Path = EXAMPLES, isolated: bool = False
) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """`pytest --vllm-platform=PLATFORM ARGS` in the example project; `isolated` runs it in an
    empty network namespace (`unshare -n`, where the machine allows it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    prefix = netns_prefix() if isolated else []
    result = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "pytest",
            f"--vllm-platform={platform}",
            "-p",
            "no:cacheprovider",
            "-rA",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    counts = {
        word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|skipped|failed|error)", result.stdout.splitlines()[-1]
        )
    }
    return result, counts


def test_examples_on_the_scripted_stub() -> None:
    result, counts = run_examples("stub-agent")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # Every test runs on the stub: tools, structured output and the scripted tool sequence.
    assert counts.get("passed", 0) >= 30 and "skipped" not in counts, result.stdout[-2000:]


@pytest.mark.real_server
def test_examples_on_the_local_model_recorded_then_replayed_offline(tmp_path: Path) -> None:
    """Recorded once on the real local model (into a copy of the example project), then
    replayed with the server gone in an empty network namespace: the same outcome per test,
    every answer from a cassette, under -n 2 too."""
    copy = tmp_path / "examples"
    shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns("cassettes", "__pycache__"))
    recorded, counts = run_examples("local", "--record-mode=once", cwd=copy)
    assert recorded.returncode == 0, recorded.stdout[-3000:] + recorded.stderr[-2000:]
    assert counts.get("passed", 0) >= 20
    # Tool tests skip by capability: `local` does not declare `tools`.
    assert "lacks capability tools" in recorded.stdout
    assert re.search(
        r"vllm: local -> http://127\.0\.0\.1:\d+/v1 model=smollm2 woke in", recorded.stdout
    )
    for extra in ([], ["-n", "2"]):
        replayed, _ = run_examples(
            "local", "--record-mode=none", "--vllm-report=report.json", *extra, cwd=copy,
            isolated=True,
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-2000:]
        assert outcomes(replayed) == outcomes(recorded)
        assert "vllm: local replayed from cassettes" in replayed.stdout
        (row,) = json.loads((copy / "report.json").read_text())["platforms"]
        assert row["requests"] == row["replayed"] > 0  # zero requests reached any server


def test_the_shipped_cassettes_replay_the_example_suite() -> None:
    """The cassettes in examples/tests/cassettes (recorded on `local`) still match the suite:
    a change to a prompt that is not re-recorded fails here."""
    result, counts = run_examples("local", "--record-mode=none", isolated=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert counts.get("passed", 0) >= 20
    assert "vllm: local replayed from cassettes" in result.stdout
