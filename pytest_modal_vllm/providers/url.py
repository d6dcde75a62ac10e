"""The `url` kind: an OpenAI-compatible base URL used as it is."""

from __future__ import annotations

from ..errors import ConfigError
from ..platforms import Platform, check_base_url, expand, normalize_base_url
from .base import Target, api_key_for


class UrlProvider:
    """Expands `${VAR}` in `base_url` and hands it on; starts and stops nothing."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def start(self) -> Target:
        """The expanded, normalized base URL with the key from `api_key_env`."""
        platform = self.platform
        assert platform.base_url is not None
        url = expand(platform.name, "base_url", platform.base_url).strip()
        if not url:
            raise ConfigError(
                f"base_url {platform.base_url!r} expands to an empty string",
                "set the variable it names to the endpoint's URL (e.g. in .env)",
                platform=platform.name,
            )
        check_base_url(platform.name, url, "after expanding ${...}")
        return Target(normalize_base_url(url), api_key_for(platform))

    def failure(self) -> str | None:
        """A URL platform has nothing of its own that can die."""
        return None

    def stop(self) -> None:
        """Nothing to stop."""
