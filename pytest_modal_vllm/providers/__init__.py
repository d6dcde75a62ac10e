"""One provider per platform kind, behind the `Provider` protocol of `base.py`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..platforms import Platform
    from .base import Provider


def make_provider(
    platform: Platform,
    *,
    deploy: bool = False,
    ephemeral: bool = False,
    log_dir: Path | None = None,
) -> Provider:
    """The provider for `platform.kind`; imports only the module of that kind."""
    if platform.kind == "url":
        from .url import UrlProvider

        return UrlProvider(platform)
    if platform.kind == "stub":
        from .stub import StubProvider

        return StubProvider(platform)
    if platform.kind == "process":
        from .process import ProcessProvider

        return ProcessProvider(platform, log_dir=log_dir)
    if platform.kind == "modal":
        from .modal import ModalProvider

        return ModalProvider(platform, deploy=deploy, ephemeral=ephemeral)
    raise ValueError(f"unknown kind {platform.kind!r}")  # platforms.validate rules this out
