"""The `stub` kind: the built-in deterministic server, in-process on a free loopback port."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..platforms import Platform
from .base import Target, api_key_for

if TYPE_CHECKING:
    from ..stub import StubServer


class StubProvider:
    """Starts a `StubServer` (echo, or the rules of `script`; `cold_start` simulated)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.server: StubServer | None = None

    def start(self) -> Target:
        """Bind the stub on 127.0.0.1 and serve it from daemon threads."""
        from ..stub import Behaviour, StubServer

        platform = self.platform
        script = str(platform.resolve_path(platform.script)) if platform.script else None
        try:
            server = StubServer(
                model=platform.model or "stub",
                script=script,
                behaviour=Behaviour(cold_start=platform.cold_start),
            )
        except ValueError as error:
            raise ConfigError(
                f"bad stub script: {error}",
                "fix the script file (see the README's stub script format)",
                platform=platform.name,
            ) from None
        self.server = server.start()
        return Target(server.base_url, api_key_for(platform))

    def failure(self) -> str | None:
        """The in-process stub cannot die on its own."""
        return None

    def stop(self) -> None:
        """Stop the server and its threads."""
        if self.server is not None:
            self.server.stop()
            self.server = None
