"""One provider per platform kind, behind the `Provider` protocol of `base.py`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..resolution import ResolvedPlatform
    from .base import Provider

# kind -> "module:class"; the module of a kind is imported only when a platform of it is used.
PROVIDERS = {
    "url": "url:UrlProvider",
    "stub": "stub:StubProvider",
    "process": "process:ProcessProvider",
    "modal": "modal:ModalProvider",
}


def make_provider(platform: ResolvedPlatform, **options: Any) -> Provider:
    """The provider for `platform.kind` (`log_dir` reaches the process provider, `sdk` the
    modal one; options a kind does not take are ignored)."""
    module_name, class_name = PROVIDERS[platform.kind].split(":")
    provider_class = getattr(importlib.import_module(f".{module_name}", __name__), class_name)
    accepted = {k: v for k, v in options.items() if k in provider_class.OPTIONS}
    provider: Provider = provider_class(platform, **accepted)
    return provider


def health_line(root_url: str, headers: dict[str, str] | None = None) -> str:
    """`answers /health now: yes` (or `no (503)`): one probe, for `modal-vllm status`."""
    from ..probe import check_health

    answer = check_health(root_url, headers or {})
    verdict = "yes" if answer.status == 200 else f"no ({answer.short()})"
    return f"answers /health now: {verdict}"
