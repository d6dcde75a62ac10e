"""The example agent's suite (examples/) runs green on `stub-agent` and on the real `local` model.

Run as users run it: `pytest --vllm-platform=NAME` inside examples/, in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_examples(platform: str) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            f"--vllm-platform={platform}",
            "-p",
            "no:cacheprovider",
            "-rs",
        ],
        cwd=EXAMPLES,
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
def test_examples_on_the_local_model() -> None:
    result, counts = run_examples("local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert counts.get("passed", 0) >= 20
    # Tool tests skip by capability: `local` does not declare `tools`.
    assert "lacks capability tools" in result.stdout
    assert re.search(
        r"vllm: local -> http://127\.0\.0\.1:\d+/v1 model=smollm2 woke in", result.stdout
    )
