"""The `modal-vllm` command, run as users run it: a subprocess in a project directory whose
pyproject.toml defines the platforms, against real fake endpoints on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import API_KEY, platforms_toml, processes_with, run_cli, stub_command

CLI = (sys.executable, "-m", "pytest_modal_vllm.cli")
HEADER = re.compile(
    r"^(\S+) -> (http://127\.0\.0\.1:\d+/v1) model=(\S+) woke in \d+\.\ds "
    r"\((warm|cold)\)$",
    re.MULTILINE,
)


def project(tmp_path: Path, platforms: dict[str, dict[str, Any]]) -> Path:
    tmp_path.joinpath("pyproject.toml").write_text(
        '[project]\nname = "demo"\n\n' + platforms_toml(platforms, "tool.modal-vllm.platforms")
    )
    return tmp_path


def stub_process_platform(token: str) -> dict[str, Any]:
    """A `process` platform that runs the stub server as a child process (model = token)."""
    return {
        "kind": "process",
        "model": token,
        "wake_timeout": 30,
        "command": stub_command(),
    }


# ---------------------------------------------------------------------------- entry points


def cli(cwd: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """`modal-vllm ARGS` with extra environment variables given as keywords."""
    return run_cli(cwd, *args, env={**os.environ, **env}, timeout=timeout)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "modal-vllm"
    assert script.is_file()
    assert os.access(script, os.X_OK)
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for command in ("platforms", "wake", "status", "deploy", "stop", "serve"):
        assert command in done.stdout


def test_usage_errors_exit_4(tmp_path: Path) -> None:
    done = cli(tmp_path, "wake", "stub", "--timeout", "-1")
    assert done.returncode == 4
    assert "'-1' must be a positive number of seconds" in done.stderr
    assert cli(tmp_path).returncode == 4  # no command


# ---------------------------------------------------------------------------- platforms


def test_platforms_table_lists_builtins_and_the_projects_own(tmp_path: Path) -> None:
    project(tmp_path, {"mine": {"kind": "url", "base_url": "http://127.0.0.1:9/v1"}})
    done = cli(tmp_path, "platforms")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SOURCE", "MODEL", "TARGET"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"env", "local", "mine", "modal-llama", "modal-qwen", "stub"}
    assert rows["mine"][:3] == ["mine", "url", "pyproject.toml"]
    assert rows["mine"][-1] == "http://127.0.0.1:9/v1"
    assert rows["modal-qwen"][:3] == ["modal-qwen", "modal", "built-in"]


def test_platforms_json(tmp_path: Path) -> None:
    project(tmp_path, {"mine": {"kind": "stub", "model": "m"}})
    tmp_path.joinpath("extra.toml").write_text(
        platforms_toml({"other": {"kind": "url", "base_url": "http://h/v1"}}, "platforms")
    )
    done = cli(tmp_path, "--config", "extra.toml", "platforms", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert all(set(row) == {"name", "kind", "source", "model", "target"} for row in rows)
    by_name = {row["name"]: row for row in rows}
    assert by_name["mine"] == {
        "name": "mine",
        "kind": "stub",
        "source": "pyproject.toml",
        "model": "m",
        "target": "in-process stub",
    }
    assert by_name["other"]["source"] == "extra.toml"
    assert by_name["other"]["target"] == "http://h/v1"
    assert by_name["modal-llama"]["kind"] == "modal"
    assert by_name["modal-llama"]["target"] == "modal app modal-vllm-llama/serve"


def test_platforms_with_a_broken_pyproject_exits_4(tmp_path: Path) -> None:
    project(tmp_path, {"mine": {"kind": "url", "base_ur": "http://h/v1"}})
    done = cli(tmp_path, "platforms")
    assert done.returncode == 4
    assert "vllm platform 'mine': unknown field 'base_ur' (did you mean 'base_url'?)" in (
        done.stderr
    )
    assert "Fix:" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- wake


def test_wake_stub_prints_the_header_line(tmp_path: Path) -> None:
    done = cli(tmp_path, "wake", "stub")
    assert done.returncode == 0, done.stderr
    match = HEADER.search(done.stdout)
    assert match, done.stdout
    assert match.group(1) == "stub"
    assert match.group(3) == "stub"
    assert "vllm: waking stub" in done.stderr  # the progress display


def test_wake_a_cold_url_platform(tmp_path: Path, endpoint_server) -> None:
    server = endpoint_server(cold_start=1.0, cold_style="refuse", model="m1")
    project(tmp_path, {"late": {"kind": "url", "base_url": server.base_url}})
    done = cli(tmp_path, "wake", "late")
    assert done.returncode == 0, done.stderr
    match = HEADER.search(done.stdout)
    assert match, done.stdout
    assert match.groups() == ("late", server.base_url, "m1", "cold")


def test_wake_never_ready_exits_75_within_the_timeout(tmp_path: Path, endpoint_server) -> None:
    server = endpoint_server(cold_start=3600, cold_style="503")
    project(tmp_path, {"slow": {"kind": "url", "base_url": server.base_url}})
    start = time.monotonic()
    done = cli(tmp_path, "wake", "slow", "--timeout", "1")
    assert time.monotonic() - start < 15
    assert done.returncode == 75
    assert "vllm platform 'slow'" in done.stderr
    assert "did not become ready within 1s (last answer: 503 Service Unavailable)" in done.stderr
    assert "Fix:" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_wake_wrong_key_exits_4(tmp_path: Path, endpoint_server) -> None:
    server = endpoint_server(api_key=API_KEY)
    project(tmp_path, {"keyed": {"kind": "url", "base_url": server.base_url}})
    done = cli(tmp_path, "wake", "keyed", VLLM_API_KEY="sk-wrong-77")
    assert done.returncode == 4
    assert "the key in VLLM_API_KEY was rejected" in done.stderr
    assert "sk-wrong-77" not in done.stderr + done.stdout
    done = cli(tmp_path, "wake", "keyed", VLLM_API_KEY=API_KEY)
    assert done.returncode == 0, done.stderr
    assert API_KEY not in done.stderr + done.stdout


def test_wake_unknown_platform_exits_4(tmp_path: Path) -> None:
    done = cli(tmp_path, "wake", "stbu")
    assert done.returncode == 4
    assert "unknown platform 'stbu' (did you mean 'stub'?)" in done.stderr
    assert "Fix:" in done.stderr


def test_wake_a_process_platform_stops_it_afterwards(tmp_path: Path) -> None:
    token = f"cli-wake-{uuid.uuid4().hex[:10]}"
    project(tmp_path, {"proc": stub_process_platform(token)})
    done = cli(tmp_path, "wake", "proc")
    assert done.returncode == 0, done.stderr
    match = HEADER.search(done.stdout)
    assert match, done.stdout
    assert match.group(3) == token
    assert processes_with(token) == []


# ---------------------------------------------------------------------------- deploy / stop


@pytest.mark.parametrize("verb", ["deploy", "stop"])
def test_deploy_and_stop_need_a_modal_platform(tmp_path: Path, verb: str) -> None:
    done = cli(tmp_path, verb, "stub")
    assert done.returncode == 4
    assert f"vllm platform 'stub': '{verb}' applies to modal platforms; this one is 'stub'" in (
        done.stderr
    )
    assert "Fix:" in done.stderr


# ---------------------------------------------------------------------------- serve


def serve(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start `modal-vllm serve NAME`; return the process, its base URL and its model."""
    process = subprocess.Popen(
        [*CLI, "serve", name],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(30, process.kill)  # a hung start cannot hang the suite
    watchdog.start()
    try:
        line = process.stdout.readline() if process.stdout else ""
    finally:
        watchdog.cancel()
    match = re.match(r"^(\S+) serving at (\S+) model=(\S+) \(Ctrl-C to stop\)$", line.strip())
    if not match:
        process.kill()
        _, err = process.communicate(timeout=10)
        pytest.fail(f"no 'serving at' line: {line!r}\n{err}")
    assert match.group(1) == name
    return process, match.group(2), match.group(3)


def interrupt(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("modal-vllm serve did not stop on SIGINT")
    return process.returncode, err


def test_serve_stub_until_ctrl_c(tmp_path: Path) -> None:
    process, base_url, model = serve(tmp_path, "stub")
    try:
        models = httpx.get(f"{base_url}/models", timeout=10)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == [model]
        answer = httpx.post(
            f"{base_url}/chat/completions",
            timeout=10,
            json={"model": model, "messages": [{"role": "user", "content": "hello there"}]},
        )
        assert answer.status_code == 200
        assert "hello there" in answer.json()["choices"][0]["message"]["content"]
    finally:
        code, err = interrupt(process)
    assert code == 0, err
    assert "Traceback" not in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base_url}/models", timeout=5)


def test_serve_a_process_platform_stops_its_child_on_ctrl_c(tmp_path: Path) -> None:
    token = f"cli-serve-{uuid.uuid4().hex[:10]}"
    project(tmp_path, {"proc": stub_process_platform(token)})
    process, base_url, model = serve(tmp_path, "proc")
    try:
        assert model == token
        assert httpx.get(f"{base_url}/models", timeout=10).status_code == 200
        assert processes_with(token)  # the child server runs
    finally:
        code, err = interrupt(process)
    assert code == 0, err
    assert processes_with(token) == []


def test_serve_refuses_a_url_platform(tmp_path: Path) -> None:
    project(tmp_path, {"remote": {"kind": "url", "base_url": "http://127.0.0.1:9/v1"}})
    done = cli(tmp_path, "serve", "remote")
    assert done.returncode == 4
    assert "'serve' runs stub and process platforms; this one is 'url'" in done.stderr


# ---------------------------------------------------------------------------- status


def test_status_of_url_platforms(tmp_path: Path, endpoint_server, refused_url: str) -> None:
    server = endpoint_server()
    dead = refused_url
    project(
        tmp_path,
        {
            "live": {"kind": "url", "base_url": server.base_url},
            "gone": {"kind": "url", "base_url": dead},
        },
    )
    done = cli(tmp_path, "status", "live")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "live: kind=url source=pyproject.toml",
        f"  url: {server.base_url}",
        "  answers /health now: yes",
    ]
    requests = dict(server.stats.requests)
    assert requests == {"/health": 1}  # looked, did not wake or list models

    done = cli(tmp_path, "status", "gone")
    assert done.returncode == 0, done.stderr
    assert f"  url: {dead}" in done.stdout
    assert "  answers /health now: no (ConnectError)" in done.stdout


def test_status_reads_dotenv_of_the_project(tmp_path: Path, endpoint_server) -> None:
    server = endpoint_server()
    project(tmp_path, {})
    tmp_path.joinpath(".env").write_text(f"VLLM_API_URL={server.root_url}\n")
    done = cli(tmp_path, "status", "env")
    assert done.returncode == 0, done.stderr
    assert f"  url: {server.base_url}" in done.stdout  # normalized to end in /v1
    assert "  answers /health now: yes" in done.stdout


def test_status_of_a_stub_platform_wakes_nothing(tmp_path: Path) -> None:
    done = cli(tmp_path, "status", "stub")
    assert done.returncode == 0
    assert "not running" in done.stdout
