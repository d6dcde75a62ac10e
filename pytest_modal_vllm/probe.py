"""One HTTP probe, used by the wake, the keep-alive ping, the clients' cold check and the CLI.

`get()` sends one GET and reports what came back (status, body, redirect target) or the
error, without following redirects; `check_health()` is one probe of `<root>/health`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

CONNECT_TIMEOUT = 10.0
# Marks the plugin's own requests (wake, keep-alive, re-wake): a recording leaves them out.
PROBE_HEADER = "X-Modal-Vllm-Probe"


def root_of(base_url: str) -> str:
    """The base URL without its `/v1` suffix: where `/health` lives."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def health_url(root_url: str) -> str:
    """`<root>/health`."""
    return f"{root_url}/health"


@dataclass(frozen=True)
class Answer:
    """What one probe got: an HTTP answer (`status`, `body`, `location`) or an `error`."""

    status: int | None = None
    body: str = ""
    location: str | None = None
    error: BaseException | None = None

    def short(self) -> str:
        """`503` or the error's class name, for one-line displays."""
        return str(self.status) if self.status is not None else type(self.error).__name__


def get(client: httpx.Client, url: str, timeout: float) -> Answer:
    """GET `url` once; the read may take `timeout` seconds (a held request is waited for)."""
    import httpx

    try:
        response = client.get(
            url,
            headers={PROBE_HEADER: "1"},
            timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
        )
    except httpx.HTTPError as error:
        return Answer(error=error)
    return Answer(response.status_code, response.text, response.headers.get("location"))


def check_health(
    root_url: str,
    headers: Mapping[str, str],
    timeout: float = 5.0,
    client: httpx.Client | None = None,
) -> Answer:
    """One `GET <root>/health` (with the platform's headers; proxy auth needs them)."""
    import httpx

    if client is not None:
        return get(client, health_url(root_url), timeout)
    with httpx.Client(headers=dict(headers)) as own:
        return get(own, health_url(root_url), timeout)
