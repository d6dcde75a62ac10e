"""The `Endpoint` value: what a woken platform is, passed from the wake to every client.

It is a plain frozen dataclass so that it crosses to xdist workers as a dict and can be built
in a unit test. Secrets (the API key, proxy tokens in `headers`) are masked in `repr`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .probe import root_of

MASK = "***"

# Header names whose values are secrets: masked wherever an Endpoint is shown.
SECRET_HEADERS = frozenset({"authorization", "modal-key", "modal-secret", "x-api-key"})


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of `headers` with every secret value replaced by `***`."""
    return {k: (MASK if k.lower() in SECRET_HEADERS else v) for k, v in headers.items()}


@dataclass(frozen=True)
class Endpoint:
    """A ready OpenAI-compatible endpoint for one platform.

    `base_url` ends in `/v1`; `api_key` is `None` when no key variable is set (vLLM without
    `--api-key` accepts any request); `headers` are extra headers for every request (Modal proxy
    auth). `wake_seconds` is how long the blocking wake took and `cold` whether it had to wait.
    """

    platform: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    wake_seconds: float = 0.0
    cold: bool = False

    @property
    def root_url(self) -> str:
        """The base URL without its `/v1` suffix: where `/health` lives."""
        return root_of(self.base_url)

    def __repr__(self) -> str:
        key = MASK if self.api_key else None
        return (
            f"Endpoint(platform={self.platform!r}, base_url={self.base_url!r}, "
            f"model={self.model!r}, api_key={key!r}, headers={mask_headers(self.headers)!r}, "
            f"wake_seconds={self.wake_seconds:.1f}, cold={self.cold!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (secrets included) for handing to xdist workers."""
        data = asdict(self)
        data["headers"] = dict(self.headers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Endpoint:
        """The inverse of `to_dict`."""
        return cls(**data)
