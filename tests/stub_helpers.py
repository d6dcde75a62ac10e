"""Helpers of the stub's own tests (test_stub_replies, test_stub_server, test_stub_emulator).

The servers come from conftest's `serve` (a `StubServer`) and `endpoint_server` (a
`ModalEmulator`) fixtures, which also close the openai clients `client_for` made.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from pytest_modal_vllm.stub import StubServer

USER: list[Any] = [{"role": "user", "content": "hello there world"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

_open_clients: list[openai.OpenAI] = []


def close_clients() -> None:
    """Close the openai clients a test made, so no client socket outlives the test."""
    while _open_clients:
        _open_clients.pop().close()


def client_for(server: StubServer, **kwargs: Any) -> openai.OpenAI:
    """An openai client of `server` that does not retry (closed at the test's teardown)."""
    kwargs.setdefault("api_key", "unused")
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 10)
    client = openai.OpenAI(base_url=server.base_url, **kwargs)
    _open_clients.append(client)
    return client


def refused(server: StubServer) -> bool:
    """True when a TCP connect to the server's port is refused."""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def stub_threads() -> list[str]:
    """The names of the stub's live threads."""
    return [t.name for t in threading.enumerate() if t.name.startswith("stub-server")]


def write_script(tmp_path: Path, text: str) -> Path:
    """A rules file with `text` in `tmp_path`."""
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path
