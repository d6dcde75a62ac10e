"""The `stub` kind: the built-in deterministic server, in-process on a free loopback port."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..resolution import ResolvedPlatform
from .base import NOT_RUNNING

if TYPE_CHECKING:
    from ..stub import StubServer


class StubProvider:
    """Starts a `StubServer` (echo, or the rules of `script`; `cold_start` simulated)."""

    OPTIONS: tuple[str, ...] = ()
    wake_note: str | None = None

    def __init__(self, platform: ResolvedPlatform) -> None:
        self.platform = platform
        self.notes: list[str] = []
        self.server: StubServer | None = None

    def start(self) -> str:
        """Bind the stub on 127.0.0.1 and serve it from daemon threads; its base URL."""
        from ..stub import Behaviour, StubServer

        platform = self.platform
        try:
            server = StubServer(
                model=platform.model or "stub",
                script=platform.script,
                behaviour=Behaviour(cold_start=platform.definition.cold_start),
            )
        except ValueError as error:
            raise ConfigError(
                f"bad stub script: {error}",
                "fix the script file (see the README's stub script format)",
                platform=platform.name,
            ) from None
        self.server = server.start()
        return server.base_url

    def failure(self) -> str | None:
        """The in-process stub cannot die on its own."""
        return None

    def status(self) -> list[str]:
        """A stub runs only inside a session."""
        return [NOT_RUNNING]

    def stop(self) -> None:
        """Stop the server and its threads."""
        if self.server is not None:
            self.server.stop()
            self.server = None
