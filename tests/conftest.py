"""Shared fixtures of the plugin's own test suite: real fake endpoints on 127.0.0.1.

`endpoint_server(**behaviour)` starts a `ModalEmulator` with the given switches (cold start
style, API key, proxy auth, redirects, scale to zero, faults) and stops it at teardown;
`serve(**kwargs)` does the same for a plain `StubServer`.
`write_platforms(pytester, {...})` writes `[tool.modal-vllm.platforms.*]` into the pytester
project's pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

# httpx/httpx2 import httpcore/httpcore2 lazily; in-process pytester runs restore sys.modules
# afterwards, so a first import inside such a run would leave two copies of their exception
# classes and break httpx's error mapping for later tests. Import them once, up front.
import httpcore  # noqa: F401
import httpcore2  # noqa: F401

# The same for the clients, for another reason: with a platform selected, the plugin imports
# openai and langchain in a background thread while the wake waits. In an in-process run that
# thread can still be importing when pytester restores sys.modules, leaving a half-imported
# pydantic behind ("cannot import name 'BaseModel' from 'pydantic.v1'" in a later test).
import langchain_openai  # noqa: F401
import openai  # noqa: F401
import pytest
from modal_emulator import EmulatorBehaviour, ModalEmulator
from stub_helpers import close_clients

from pytest_modal_vllm.stub import StubServer

EMULATOR_SCRIPT = Path(__file__).resolve().parent / "modal_emulator.py"

# Plugins a pytester subprocess run does not need: each costs start-up time (langsmith's, which
# comes with langchain, most of a second of imports).
FAST = (
    "-p",
    "no:asyncio",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:langsmith_plugin",
    "-p",
    "no:anyio",
    "-p",
    "no:xdist",
)


def run_cli(
    cwd: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `modal-vllm ARGS` (as `python -m pytest_modal_vllm.cli`) in `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", "pytest_modal_vllm.cli", *args],
        cwd=cwd,
        env=dict(os.environ if env is None else env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stub_command(*extra: str) -> list[str]:
    """A `process` platform command that runs the stub server as a child process (its model
    name, `{model}`, doubles as a marker to find the process in /proc)."""
    return [
        sys.executable,
        str(EMULATOR_SCRIPT),
        "--port",
        "{port}",
        "--model",
        "{model}",
        *extra,
    ]


def netns_prefix() -> list[str]:
    """`unshare -n`: a network namespace with nothing in it (loopback down). The replays run
    there when the machine allows it (root, util-linux); elsewhere without it."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n", "--"] if probe.returncode == 0 else []


def outcomes(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """test id -> PASSED/FAILED/..., from the `-rA` summary."""
    found = {}
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "SKIPPED") and "::" in rest:
            found[rest.split(" ", 1)[0]] = word
    return found


def load_module(path: Path, name: str) -> ModuleType:
    """Import a file as module `name`, once, without leaving it in sys.modules (the Modal
    app's files: their modal objects are lazy, so no token or network is needed)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


ROOT = Path(__file__).resolve().parent.parent
# Read at import, before pytester points HOME at a temporary directory.
VLLM_CPU_CACHE = os.environ.get("MODAL_VLLM_CACHE") or str(
    Path.home() / ".cache" / "pytest-modal-vllm"
)


def require_vllm_cpu() -> None:
    """The gate of the real vLLM CPU tier: skipped only under `MODAL_VLLM_SKIP_VLLM_CPU=1`
    (the documented opt-out); otherwise a missing setup fails with the command to run."""
    if os.environ.get("MODAL_VLLM_SKIP_VLLM_CPU") == "1":
        pytest.skip("MODAL_VLLM_SKIP_VLLM_CPU=1: the real vLLM CPU tier is switched off")
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "setup_vllm_cpu.py"), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "MODAL_VLLM_CACHE": VLLM_CPU_CACHE},
    )
    if check.returncode != 0:
        pytest.fail(
            "the vLLM CPU server is not set up: run `python scripts/setup_vllm_cpu.py` "
            f"(about 3 minutes, cached afterwards)\n{check.stdout}{check.stderr}",
            pytrace=False,
        )


def processes_with(token: str) -> list[int]:
    """Live processes whose command line contains `token`, read from /proc (zombies have an
    empty command line, so they do not count)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if token.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# Secrets used by the tests: the leak checks grep every output for these.
API_KEY = "sk-test-4f1d9c2b7a"
PROXY_KEY = "wk-proxy-91b2c3"
PROXY_SECRET = "ws-proxy-secret-77aa1e"
SECRETS = (API_KEY, PROXY_KEY, PROXY_SECRET)


@pytest.fixture(autouse=True)
def _clean_plugin_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs under test must not see the developer's platform choice or keys."""
    for name in list(os.environ):
        if name.startswith("MODAL_VLLM_") or name in (
            "VLLM_API_KEY",
            "VLLM_API_URL",
            "VLLM_MODEL",
            "GITHUB_STEP_SUMMARY",
        ):
            monkeypatch.delenv(name, raising=False)
    # Never let a test reach Modal's cloud with real or fake credentials.
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A base URL on 127.0.0.1 whose connections are refused for the whole test.

    The port stays bound (never listening) until teardown: a port merely closed again can be
    taken by another test's server under xdist, which then answers instead of refusing.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture
def serve() -> Iterator[Callable[..., StubServer]]:
    """Factory: `serve(model="m", behaviour=Behaviour(...))` -> a started `StubServer`; at
    teardown every server is stopped and the openai clients of `stub_helpers` are closed."""
    servers: list[StubServer] = []

    def start(cls: type[StubServer] = StubServer, **kwargs: Any) -> StubServer:
        server = cls(**kwargs)
        servers.append(server)
        return server.start()

    yield start
    close_clients()
    for server in servers:
        server.stop()


@pytest.fixture
def endpoint_server(serve: Callable[..., Any]) -> Callable[..., ModalEmulator]:
    """Factory: `endpoint_server(cold_start=2, cold_style="hold", model="m", ...)` -> a
    started `ModalEmulator` (every keyword but `model` and `script` is an emulator switch)."""

    def start(*, model: str = "stub", script: str | None = None, **switches: Any) -> ModalEmulator:
        behaviour = EmulatorBehaviour(**switches)
        server: ModalEmulator = serve(
            ModalEmulator, model=model, script=script, behaviour=behaviour
        )
        return server

    return start


def toml_value(value: Any) -> str:
    """A Python value as TOML (enough for platform tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def platforms_toml(platforms: Mapping[str, Mapping[str, Any]], prefix: str) -> str:
    """`[prefix.NAME]` tables for each platform."""
    chunks = []
    for name, fields in platforms.items():
        lines = [f"[{prefix}.{name}]"] + [f"{k} = {toml_value(v)}" for k, v in fields.items()]
        chunks.append("\n".join(lines))
    return "\n\n".join(chunks) + "\n"


@pytest.fixture
def write_platforms(pytester: pytest.Pytester) -> Callable[..., None]:
    """Write platform tables into the pytester project's pyproject.toml (with ini extras)."""

    def write(platforms: Mapping[str, Mapping[str, Any]], ini: str = "") -> None:
        text = "[tool.pytest.ini_options]\n" + ini + "\n\n"
        text += platforms_toml(platforms, "tool.modal-vllm.platforms")
        pytester.path.joinpath("pyproject.toml").write_text(text)

    return write


LLM_TEST = """
def test_openai(openai_client, vllm_endpoint):
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, messages=[{"role": "user", "content": "ping"}]
    )
    assert answer.choices[0].message.content

def test_chat_model(chat_model):
    assert chat_model.invoke("hello").content
"""


@pytest.fixture
def llm_suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester project with two LLM tests (openai_client and chat_model)."""
    pytester.makepyfile(test_llm=LLM_TEST)
    return pytester


def assert_no_secrets(*texts: str) -> None:
    """Fail if any test secret appears in any of the texts."""
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"secret {secret[:6]}... leaked"
