"""The tests' Modal emulator, for the benchmarks (it is test tooling, not shipped).

`from emulator import ModalEmulator, EmulatorBehaviour` in a benchmark puts `tests/` on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from modal_emulator import EmulatorBehaviour, ModalEmulator  # noqa: E402 (tests/ first)

# The emulator as a process: `python EMULATOR_SCRIPT --port 0 ...`.
EMULATOR_SCRIPT = TESTS / "modal_emulator.py"

__all__ = ["EMULATOR_SCRIPT", "EmulatorBehaviour", "ModalEmulator"]
