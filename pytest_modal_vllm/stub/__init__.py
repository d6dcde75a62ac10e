"""The deterministic OpenAI-compatible stub server, and the Modal emulator built on it.

- `replies`: the deterministic replies (script rules, JSON schema sampler, bodies, streams);
- `transport`: the HTTP plumbing (threaded listener, body reading, answers);
- `server`: `StubServer`, the built-in `stub` platform (HTTP, OpenAI routes, API key, cold start);
- `emulator`: `ModalEmulator`, a `StubServer` that acts like a Modal web endpoint (held requests,
  303, scale to zero, billing, proxy auth) with fault switches and a control API (`/__modal/`),
  the fake endpoint of the tests.

Standard library only. Run one in the foreground with `python -m pytest_modal_vllm.stub --help`.
"""

from __future__ import annotations

from .emulator import (
    COLD_STYLES,
    FAIL_MODES,
    EmulatorBehaviour,
    EmulatorStats,
    ModalEmulator,
    check_autoscaler,
)
from .replies import CREATED, Rule, load_script, sample_from_schema
from .server import Behaviour, Stats, StubServer

__all__ = [
    "COLD_STYLES",
    "CREATED",
    "FAIL_MODES",
    "Behaviour",
    "EmulatorBehaviour",
    "EmulatorStats",
    "ModalEmulator",
    "Rule",
    "Stats",
    "StubServer",
    "check_autoscaler",
    "load_script",
    "sample_from_schema",
]
