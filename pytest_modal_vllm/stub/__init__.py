"""The deterministic OpenAI-compatible stub server of the built-in `stub` platform.

- `replies`: the deterministic replies (script rules, JSON schema sampler, bodies, streams);
- `transport`: the HTTP plumbing (threaded listener, body reading, answers);
- `server`: `StubServer`: HTTP, the OpenAI routes, the API key and a simulated cold start,
  with hooks for variants (the tests' Modal emulator, `tests/modal_emulator.py`, is one).

Standard library only. `modal-vllm serve stub` runs one in the foreground.
"""

from __future__ import annotations

from .replies import Rule, load_script, sample_from_schema
from .server import Behaviour, Stats, StubServer

__all__ = ["Behaviour", "Rule", "Stats", "StubServer", "load_script", "sample_from_schema"]
