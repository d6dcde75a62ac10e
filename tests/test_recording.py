"""Record once, replay anywhere: pytest-recording's --record-mode on LLM tests, through the
plugin, recorded against real servers on loopback and replayed with the server gone and (where
the machine allows it) in an empty network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    API_KEY,
    PROXY_KEY,
    PROXY_SECRET,
    SECRETS,
    netns_prefix,
    outcomes,
    platforms_toml,
)
from modal_emulator import ModalEmulator

TESTS = Path(__file__).resolve().parent
# Plugins these runs do not need (langsmith's alone costs seconds of imports).
QUIET = ("-p", "no:cacheprovider", "-p", "no:langsmith_plugin", "-p", "no:anyio")

SUITE = """
import asyncio
import time

def ask(client, endpoint, text):
    answer = client.chat.completions.create(
        model=endpoint.model, messages=[{"role": "user", "content": text}]
    )
    return answer.choices[0].message.content

def test_chat(openai_client, vllm_endpoint):
    assert ask(openai_client, vllm_endpoint, "hello one") == "echo: hello one"
    time.sleep(0.6)  # the ping keep-alive runs meanwhile: it must not be recorded

def test_stream(openai_client, vllm_endpoint):
    chunks = list(openai_client.chat.completions.create(
        model=vllm_endpoint.model, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "stream two"}],
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream two"
    assert chunks[-1].usage.completion_tokens == 3

def test_langchain(chat_model):
    assert chat_model.invoke("lang three").content == "echo: lang three"

def test_async(async_openai_client, vllm_endpoint):
    async def run():
        answer = await async_openai_client.chat.completions.create(
            model=vllm_endpoint.model, messages=[{"role": "user", "content": "async four"}]
        )
        return answer.choices[0].message.content
    assert asyncio.run(run()) == "echo: async four"

def test_no_llm():
    assert True
"""


class Project:
    """A test project in a directory of its own, run with pytest in subprocesses."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path, self.env = path, env

    def pytest(self, *args: str, isolated: bool = False) -> subprocess.CompletedProcess[str]:
        prefix = netns_prefix() if isolated else []
        return subprocess.run(
            [*prefix, sys.executable, "-m", "pytest", *QUIET, "-rA", *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def cassette_text(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.path.rglob("cassettes/**/*.yaml")))


@pytest.fixture
def project(tmp_path: Path) -> Callable[..., Project]:
    def make(platforms: dict[str, dict[str, Any]], **env: str) -> Project:
        (tmp_path / "pyproject.toml").write_text(
            '[tool.pytest.ini_options]\nvllm_env_file = ""\n\n'
            + platforms_toml(platforms, "tool.modal-vllm.platforms")
        )
        (tmp_path / "test_llm.py").write_text(SUITE)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FAKE_"))}
        return Project(tmp_path, {**clean, **env})

    return make


def test_recorded_once_then_replayed_with_the_endpoint_gone(
    project: Callable[..., Project], endpoint_server: Callable[..., ModalEmulator]
) -> None:
    server = endpoint_server(api_key=API_KEY)
    platform = {
        "kind": "url",
        "base_url": "${LLM_URL}",
        "keep_alive": "ping",
        "keep_alive_interval": 0.2,
    }
    app = project({"p": platform}, LLM_URL=server.base_url, VLLM_API_KEY=API_KEY)

    recorded = app.pytest("--vllm-platform=p", "--record-mode=once")
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    assert outcomes(recorded)["test_llm.py::test_chat"] == "PASSED"
    text = app.cassette_text()
    for secret in SECRETS:
        assert secret not in text  # the key in Authorization is filtered out
    assert "authorization" not in text.lower()
    assert "/health" not in text and "X-Modal-Vllm-Probe" not in text  # wake and pings
    assert len(list(app.path.glob("cassettes/test_llm/*.yaml"))) == 4  # the LLM tests only
    endpoints = json.loads((app.path / "cassettes" / "modal-vllm-endpoints.json").read_text())
    assert endpoints == {"p": {"base_url": server.base_url, "model": "stub"}}
    chat_requests = server.stats.chat_requests

    server.stop()  # the endpoint is gone; no key, no URL variable: nothing to resolve
    app.env.pop("VLLM_API_KEY")
    app.env.pop("LLM_URL")
    for extra in ([], ["-n", "2"]):
        replayed = app.pytest(
            "--vllm-platform=p", "--record-mode=none", "--vllm-report=report.json", *extra,
            isolated=True,
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-2000:]
        assert outcomes(replayed) == outcomes(recorded)
        assert "vllm: p replayed from cassettes" in replayed.stdout
        (row,) = json.loads((app.path / "report.json").read_text())["platforms"]
        assert row["requests"] == row["replayed"] == 4  # every answer came from a cassette
        assert row["wake_seconds"] is None
    assert server.stats.chat_requests == chat_requests


def test_a_changed_prompt_fails_exactly_that_test_showing_the_mismatch(
    project: Callable[..., Project], endpoint_server: Callable[..., ModalEmulator]
) -> None:
    server = endpoint_server()
    app = project({"p": {"kind": "url", "base_url": server.base_url}})
    assert app.pytest("--vllm-platform=p", "--record-mode=once").returncode == 0
    suite = app.path / "test_llm.py"
    suite.write_text(suite.read_text().replace('"hello one") == "echo: hello one"', '"hello 1")'))

    replayed = app.pytest("--vllm-platform=p", "--record-mode=none", isolated=True)

    assert replayed.returncode == 1
    assert outcomes(replayed)["test_llm.py::test_chat"] == "FAILED"
    assert list(outcomes(replayed).values()).count("FAILED") == 1
    assert "no recording answers this request (replaying cassettes)" in replayed.stdout
    assert "body.messages[0].content is 'hello 1' here, 'hello one' in the recording" in (
        replayed.stdout
    )
    assert "Connection error" not in replayed.stdout


def test_replaying_without_a_recording_names_the_fix(
    project: Callable[..., Project], endpoint_server: Callable[..., ModalEmulator]
) -> None:
    app = project({"p": {"kind": "url", "base_url": "http://127.0.0.1:9/v1"}})
    result = app.pytest("--vllm-platform=p", "--record-mode=none")
    assert result.returncode == 4
    assert "vllm platform 'p'" in result.stderr
    assert "pytest --vllm-platform=p --record-mode=once" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_users_vcr_config_wins_and_the_rest_still_applies(
    project: Callable[..., Project], endpoint_server: Callable[..., ModalEmulator]
) -> None:
    server = endpoint_server(api_key=API_KEY)
    app = project({"p": {"kind": "url", "base_url": server.base_url}}, VLLM_API_KEY=API_KEY)
    (app.path / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef vcr_config():\n"
        "    return {'match_on': ['method', 'path']}\n"
    )
    assert app.pytest("--vllm-platform=p", "--record-mode=once").returncode == 0
    assert API_KEY not in app.cassette_text()  # the plugin's filter still applies
    suite = app.path / "test_llm.py"
    suite.write_text(suite.read_text().replace('"hello one") == "echo: hello one"', '"hello 1")'))
    # The user's match_on (no body) wins: the changed prompt still finds its recording.
    replayed = app.pytest("--vllm-platform=p", "--record-mode=none", isolated=True)
    assert replayed.returncode == 0, replayed.stdout[-3000:]


def test_a_modal_platform_replays_without_modal_or_credentials(
    project: Callable[..., Project],
    endpoint_server: Callable[..., ModalEmulator],
    tmp_path: Path,
) -> None:
    server = endpoint_server(proxy_auth=(PROXY_KEY, PROXY_SECRET), api_key=API_KEY)
    calls = tmp_path / "calls.jsonl"
    app = project(
        {"mod": {"kind": "modal", "app": "my-app", "proxy_auth": True}},
        PYTHONPATH=str(TESTS),
        MODAL_VLLM_SDK_ADAPTER="fake_modal:FakeModal",
        FAKE_MODAL_URLS=json.dumps({"my-app/serve": server.root_url}),
        FAKE_MODAL_STATE=str(tmp_path / "state.json"),
        FAKE_MODAL_CALLS=str(calls),
        MODAL_PROXY_TOKEN_ID=PROXY_KEY,
        MODAL_PROXY_TOKEN_SECRET=PROXY_SECRET,
        VLLM_API_KEY=API_KEY,
    )
    recorded = app.pytest("--vllm-platform=mod", "--record-mode=once")
    assert recorded.returncode == 0, recorded.stdout[-3000:]
    text = app.cassette_text()
    for secret in SECRETS:
        assert secret not in text  # Authorization, Modal-Key and Modal-Secret filtered
    assert "modal-key" not in text.lower()

    calls.unlink()
    for name in ("MODAL_PROXY_TOKEN_ID", "MODAL_PROXY_TOKEN_SECRET", "VLLM_API_KEY"):
        app.env.pop(name)  # a fork's pull request: no secrets at all
    app.env["FAKE_MODAL_NO_AUTH"] = "1"
    replayed = app.pytest("--vllm-platform=mod", "--record-mode=none", isolated=True)
    assert replayed.returncode == 0, replayed.stdout[-3000:] + replayed.stderr[-2000:]
    assert outcomes(replayed) == outcomes(recorded)
    assert not calls.exists()  # nothing asked Modal anything
