"""Idle overhead: what the installed plugin costs a run that selects no platform.

Runs `pytest --collect-only -q` on a generated 300-test suite, alternating runs with the plugin
and with `-p no:modal_vllm`, and reports the median of each and their ratio; also the import
time of `pytest_modal_vllm.plugin` in a fresh interpreter (median of several).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = 300
ROUNDS = 11


def make_suite(root: Path) -> None:
    """Ten modules of 30 tests each; a third of them use an LLM fixture."""
    for module in range(10):
        lines = []
        for index in range(TESTS // 10):
            uses = "openai_client" if index % 3 == 0 else ""
            lines.append(f"def test_{module}_{index}({uses}):\n    assert True\n")
        (root / f"test_m{module}.py").write_text("\n".join(lines))
    (root / "pytest.ini").write_text("[pytest]\n")


def run(root: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *extra],
        cwd=root,
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def import_time() -> float:
    code = (
        "import time; t=time.perf_counter(); import pytest_modal_vllm.plugin; "
        "print(time.perf_counter()-t)"
    )
    samples = []
    for _ in range(ROUNDS):
        out = subprocess.run(
            [sys.executable, "-c", "import pytest; " + code],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        samples.append(float(out))
    return statistics.median(samples)


def main() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_suite(root)
        run(root)  # warm the file cache and bytecode
        run(root, "-p", "no:modal_vllm")
        with_plugin, without = [], []
        for _ in range(ROUNDS):
            with_plugin.append(run(root))
            without.append(run(root, "-p", "no:modal_vllm"))
    result = {
        "collect_with_plugin_s": statistics.median(with_plugin),
        "collect_without_plugin_s": statistics.median(without),
        "plugin_import_ms": import_time() * 1000,
    }
    result["ratio"] = result["collect_with_plugin_s"] / result["collect_without_plugin_s"]
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
