"""`StubServer` over real HTTP on 127.0.0.1: routes, keep-alive, API key, the simple cold start,
clean stops, and the emulator script as a process.

No mocks: each test starts a server on a free loopback port and talks to it with the `openai`
client (what users use) or `httpx` (to see raw statuses, headers and bodies). Waits are bounded
polls, never timed asserts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import EMULATOR_SCRIPT
from stub_helpers import USER, client_for, stub_threads, wait_for, write_script

from pytest_modal_vllm import stub
from pytest_modal_vllm.stub import Behaviour, StubServer
from pytest_modal_vllm.stub.replies import CREATED

REPO_ROOT = Path(stub.__file__).resolve().parents[2]


def test_health_and_models(serve: Callable[..., StubServer]) -> None:
    server = serve(model="my-model")
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.root_url == f"http://127.0.0.1:{server.port}"
    health = httpx.get(f"{server.root_url}/health")
    assert (health.status_code, health.content) == (200, b"")
    models = httpx.get(f"{server.base_url}/models").json()
    assert models == {
        "object": "list",
        "data": [
            {
                "id": "my-model",
                "object": "model",
                "created": CREATED,
                "owned_by": "stub",
            }
        ],
    }
    assert [m.id for m in client_for(server).models.list()] == ["my-model"]


def test_keep_alive_reuses_one_connection(serve: Callable[..., StubServer]) -> None:
    server = serve()
    body = {"model": "stub", "messages": USER}
    with httpx.Client() as http:
        for _ in range(3):
            assert http.get(f"{server.root_url}/health").status_code == 200
            assert http.post(f"{server.base_url}/chat/completions", json=body).status_code == 200
        with http.stream(
            "POST", f"{server.base_url}/chat/completions", json={**body, "stream": True}
        ) as streamed:
            streamed.read()
        assert http.get(f"{server.base_url}/models").status_code == 200
    assert server.stats.connections == 1


def test_unknown_model_and_path(serve: Callable[..., StubServer]) -> None:
    server = serve(model="served")
    with pytest.raises(openai.NotFoundError) as info:
        client_for(server).chat.completions.create(model="other", messages=USER)
    assert "The model `other` does not exist." in str(info.value)
    raw = httpx.post(f"{server.base_url}/chat/completions", json={"model": "x", "messages": USER})
    assert raw.status_code == 404
    assert raw.json()["error"]["type"] == "NotFoundError"
    nowhere = httpx.get(f"{server.root_url}/nowhere")
    assert nowhere.status_code == 404
    assert nowhere.json() == {"detail": "Not Found"}
    bad = httpx.post(f"{server.base_url}/chat/completions", content=b"not json")
    assert bad.status_code == 400


def test_refuse_then_503_then_ready_in_that_order(serve: Callable[..., StubServer]) -> None:
    # The one test driven by the clock alone: 1 s refusing, then 1 s answering 503. The client
    # is built first: on a loaded machine that alone can take longer than a phase.
    seen: list[str] = []
    with httpx.Client(timeout=2) as http:
        server = serve(behaviour=Behaviour(cold_start=2.0))  # the default style
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] != "200") and time.monotonic() < deadline:
            try:
                outcome = str(http.get(f"{server.root_url}/health").status_code)
            except httpx.ConnectError:
                outcome = "refused"
            if not seen or seen[-1] != outcome:
                seen.append(outcome)
            time.sleep(0.02)
    assert seen == ["refused", "503", "200"]
    assert server.stats.cold_starts == 1


def test_api_key(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(api_key="sekret"))
    no_key = httpx.get(f"{server.base_url}/models")
    assert (no_key.status_code, no_key.json()) == (401, {"error": "Unauthorized"})
    wrong = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer sekret"})
    assert good.status_code == 200
    assert httpx.get(f"{server.root_url}/health").status_code == 200  # like vLLM
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="nope").chat.completions.create(model="stub", messages=USER)
    result = client_for(server, api_key="sekret").chat.completions.create(
        model="stub", messages=USER
    )
    assert result.choices[0].message.content == "echo: hello there world"
    assert server.stats.unauthorized == 3
    assert "sekret" not in repr(server.behaviour)


def test_context_manager_and_thread_cleanup() -> None:
    with httpx.Client() as http:
        with StubServer() as server:
            assert http.get(f"{server.root_url}/health").status_code == 200
            assert stub_threads()
        # The client's keep-alive connection is still open: stop() must not wait on it.
        assert stub_threads() == []
    assert server.state == "stopped"


def test_module_import_is_cheap() -> None:
    # Import the package in a fresh interpreter and check that the HTTP machinery (and the TOML
    # parser) is not imported until a server starts (or a script is read).
    code = (
        "import sys\n"
        "import pytest_modal_vllm.stub\n"
        "print(sorted(m for m in ('http.server', 'socketserver', 'tomllib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env()
    )
    assert out.stdout.strip() == "[]"


def test_behaviour_validation() -> None:
    with pytest.raises(ValueError, match="cold_start"):
        Behaviour(cold_start=-1)


# -- the emulator as a process (tests/modal_emulator.py) ---------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def child_stub(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python tests/modal_emulator.py ARGS` as a child process: (process, base URL) once it
    says it is ready; killed afterwards if it still runs."""
    command = [sys.executable, str(EMULATOR_SCRIPT), *args]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as proc:
        watchdog = threading.Timer(20, proc.kill)  # a hung child must not hang the suite
        watchdog.start()
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("stub server ready at http://127.0.0.1:")
            assert line.endswith("/v1")
            yield proc, line.removeprefix("stub server ready at ")
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_emulator_script_serves_until_a_signal(tmp_path: Path, signum: int) -> None:
    script = write_script(tmp_path, "[[rules]]\nreply = 'scripted'\n")
    args = ["--port", "0", "--host", "127.0.0.1", "--model", "child", "--script", str(script)]
    args += ["--cold-start", "0.3", "--api-key", "k"]
    with child_stub(*args) as (proc, base_url):
        health = base_url.removesuffix("/v1") + "/health"
        wait_for(lambda: httpx.get(health).status_code == 200, 10)  # through the cold start
        with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
            result = client.chat.completions.create(model="child", messages=USER)
        assert result.choices[0].message.content == "scripted"
        proc.send_signal(signum)
        assert proc.wait(10) == 0
        assert proc.stdout is not None and proc.stdout.read() == ""
        assert proc.stderr is not None and proc.stderr.read() == ""


def test_the_emulator_script_runs_with_its_switches() -> None:
    args = ("--cold-style", "hold", "--startup-exit", "exit code 3")
    with child_stub(*args) as (proc, base_url):
        failed = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=10)
        assert (failed.status_code, failed.text) == (
            500,
            "container exited during startup: exit code 3",
        )
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_emulator_script_fails_cleanly_on_a_bad_script(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    command = [sys.executable, str(EMULATOR_SCRIPT), "--script", str(missing)]
    out = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=20)
    assert out.returncode == 2
    assert f"stub script {missing}: file not found" in out.stderr
    assert out.stdout == ""
