"""The `url` kind: an OpenAI-compatible base URL used as it is."""

from __future__ import annotations

from ..probe import root_of
from ..resolution import ResolvedPlatform
from . import health_line


class UrlProvider:
    """Hands on the resolved base URL; starts and stops nothing."""

    OPTIONS: tuple[str, ...] = ()
    wake_note: str | None = None

    def __init__(self, platform: ResolvedPlatform) -> None:
        self.platform = platform
        self.notes: list[str] = []

    def start(self) -> str:
        """The base URL (expanded and normalized by the resolution)."""
        assert self.platform.base_url is not None
        return self.platform.base_url

    def failure(self) -> str | None:
        """A URL platform has nothing of its own that can die."""
        return None

    def status(self) -> list[str]:
        """The URL and whether it answers `/health` now."""
        url = self.start()
        return [f"url: {url}", health_line(root_of(url), dict(self.platform.headers))]

    def stop(self) -> None:
        """Nothing to stop."""
