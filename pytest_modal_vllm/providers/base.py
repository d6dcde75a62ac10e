"""The one small interface every platform kind implements.

A provider turns a `ResolvedPlatform` into a reachable base URL (deploying, starting or
locating what is needed), can say whether what it started has died, describes itself for
`modal-vllm status` without waking anything, and stops what it started. `session.py` and the
CLI drive providers, through `providers.make_provider`, the only switch on the kind.
"""

from __future__ import annotations

from typing import Protocol

from ..resolution import ResolvedPlatform

# `status` of the kinds that run only inside a session (stub, process).
NOT_RUNNING = "not running: started for each session (modal-vllm serve runs it)"


class Provider(Protocol):
    """Start, watch, describe and stop the endpoint of one platform."""

    platform: ResolvedPlatform
    # Set by `start()` when the provider knows whether a cold start is coming: the wake's
    # first progress line (the modal provider asks Modal whether a container runs).
    wake_note: str | None
    # Lines `start()` wants the user to read (e.g. that a deploy was skipped, and why).
    notes: list[str]

    def start(self) -> str:
        """Deploy, start or locate the endpoint; its base URL (ending in `/v1`).

        Raises `ConfigError`/`UnavailableError`.
        """
        ...

    def failure(self) -> str | None:
        """Why the endpoint can no longer come up (a dead process), or `None` while it can."""
        ...

    def status(self) -> list[str]:
        """Lines for `modal-vllm status`: where the endpoint is and its state; wakes nothing."""
        ...

    def stop(self) -> None:
        """Stop whatever `start` started; safe to call twice and after a failed start."""
        ...
