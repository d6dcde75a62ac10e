"""Closed by default: an ASGI middleware that demands the API key on every path but `/health`.

vLLM's own key check (`--api-key`, or `VLLM_API_KEY` when that flag is absent) guards only
paths under `/v1`, `/v2`, `/inference` and `/cohere`. Everything else answers without a key:
`POST /invocations` runs a chat completion (measured on vLLM 0.32), and `/tokenize`,
`/detokenize`, `/metrics`, `/pooling`, `/score`, `/rerank`, `/classify`, `/version`, `/docs`
and, with `VLLM_SERVER_DEV_MODE=1`, `/sleep`, `/wake_up`, `/collective_rpc` and the other dev
routes are open. This middleware closes all of them.

vLLM loads it by import path (`--middleware vllm_auth.BearerAuthMiddleware`, the module on the
server's `PYTHONPATH`) and builds it with the ASGI app as its only argument, so the key comes
from the environment: `VLLM_API_KEY`, the variable the Modal Secret provides. The key never
appears in vLLM's command line.

The rules:

- `Authorization: Bearer <key>` (scheme case-insensitive) on every HTTP request and websocket,
  compared in constant time (SHA-256 digests through `hmac.compare_digest`, so neither the
  key's length nor its content leaks through timing);
- one path stays open: exactly `/health` (after vLLM's `--root-path`, if any). It says only
  "200: serving" or "503: engine dead", and it is what load balancers and the plugin's wake
  probe call before they have a key;
- CORS preflight (`OPTIONS`) is NOT exempt: the clients of this server are test suites, not
  browser pages, and an open `OPTIONS` would only serve cross-origin use of the key from a
  browser. vLLM's own check exempts it; this one does not;
- without the key: HTTP 401 with `{"error": "Unauthorized"}` (vLLM's own answer) and
  `WWW-Authenticate: Bearer`; a websocket is closed before it is accepted (code 1008, which
  the server sends as HTTP 403);
- no key configured (`VLLM_API_KEY` unset or empty): every request but `/health` is refused.
  It fails closed; the Modal app never starts vLLM like that (it checks the Secret first).

Pure standard library: importable (and tested) without vLLM, Starlette or a network.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

KEY_ENV = "VLLM_API_KEY"
# Paths answered without the key. Keep this minimal: every entry is reachable by anyone who
# knows the URL.
OPEN_PATHS = frozenset({"/health"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNAUTHORIZED_BODY = json.dumps({"error": "Unauthorized"}).encode()


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first `Authorization: Bearer ...` header, or None."""
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return token.strip()
    return None


def request_path(scope: Scope) -> str:
    """The path the app routes on: `scope["path"]` without vLLM's `--root-path` prefix."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "") or "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class BearerAuthMiddleware:
    """Require `Authorization: Bearer <VLLM_API_KEY>` on every path but `/health`."""

    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        self.app = app
        key = os.environ.get(KEY_ENV, "") if api_key is None else api_key
        self._digest = _digest(key.encode()) if key else None
        if self._digest is None:
            print(
                f"vllm_auth: {KEY_ENV} is not set: every request but /health is refused",
                file=sys.stderr,
                flush=True,
            )

    def authorized(self, scope: Scope) -> bool:
        """Whether the request carries the key (always False when no key is configured)."""
        if self._digest is None:
            return False
        token = bearer_token(scope.get("headers") or [])
        if token is None:
            return False
        return hmac.compare_digest(_digest(token), self._digest)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):  # lifespan: start-up and shutdown events
            await self.app(scope, receive, send)
            return
        if (kind == "http" and request_path(scope) in OPEN_PATHS) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            # Closing before `websocket.accept` refuses the handshake (uvicorn answers 403).
            await send({"type": "websocket.close", "code": 1008, "reason": "Unauthorized"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(UNAUTHORIZED_BODY)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
