"""The `modal` kind end to end: pytest sessions (subprocesses) against a fake Modal SDK adapter
and a Modal-like emulator (a `ModalEmulator`: held requests, scale to zero and proxy auth).

The subprocesses load `tests/fake_modal.py` through the adapter seam
(`MODAL_VLLM_SDK_ADAPTER=fake_modal:FakeModal`, `tests/` on `PYTHONPATH`); the emulator lives in
this process, so its counters (`stats.cold_starts`) are read here after each run.

Before each run the emulator is scaled to zero, as a Modal endpoint is after idle: the session's
wake is then the boot that serves it, however long the subprocess took to start. Boots are
counted from there (`boots()`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, PROXY_KEY, PROXY_SECRET, assert_no_secrets
from fake_modal import read_calls
from modal_emulator import ModalEmulator

TESTS_DIR = Path(__file__).resolve().parent
APP = "my-app"
RUN_TIMEOUT = 90.0
# Plugins the runs do not need; langsmith's (installed with langchain) alone costs seconds.
QUIET_PLUGINS = ("-p", "no:asyncio", "-p", "no:langsmith_plugin", "-p", "no:anyio")

ASK = """
def ask(openai_client, vllm_endpoint, text="ping"):
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, messages=[{"role": "user", "content": text}]
    )
    assert answer.choices[0].message.content
"""


class FakeModalFiles:
    """The fake adapter's files and variables for one test."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.calls_path = tmp_path / "modal-calls.jsonl"
        self.state_path = tmp_path / "modal-state.json"

    def urls(self, urls: dict[str, str], *, deployed: str | None = None) -> None:
        """Which "app/function" exist; `deployed` (comma-separated apps) limits what is."""
        self.monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps(urls))
        if deployed is not None:
            self.monkeypatch.setenv("FAKE_MODAL_DEPLOYED", deployed)

    def calls(self) -> list[dict[str, Any]]:
        return read_calls(self.calls_path)

    def names(self) -> list[str]:
        return [call["call"] for call in self.calls()]


@pytest.fixture
def fake_modal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeModalFiles:
    """Point pytest subprocesses at the fake Modal adapter, with its call log and state."""
    files = FakeModalFiles(tmp_path, monkeypatch)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("MODAL_VLLM_SDK_ADAPTER", "fake_modal:FakeModal")
    monkeypatch.setenv("FAKE_MODAL_CALLS", str(files.calls_path))
    monkeypatch.setenv("FAKE_MODAL_STATE", str(files.state_path))
    for name in (
        "FAKE_MODAL_URLS",
        "FAKE_MODAL_DEPLOYED",
        "FAKE_MODAL_FAIL",
        "FAKE_MODAL_NO_AUTH",
        "MODAL_PROXY_TOKEN_ID",
        "MODAL_PROXY_TOKEN_SECRET",
        "MODAL_ENVIRONMENT",
    ):
        monkeypatch.delenv(name, raising=False)
    return files


@pytest.fixture
def emulator(endpoint_server: Callable[..., ModalEmulator]) -> Callable[..., ModalEmulator]:
    """Factory: a Modal-like emulator, already scaled to zero (the wake boots it)."""

    def start(**behaviour: Any) -> ModalEmulator:
        server = endpoint_server(**behaviour)
        server.scale_to_zero()
        return server

    return start


def boots(server: ModalEmulator) -> int:
    """Container boots since the emulator was scaled to zero before the run."""
    return server.stats.cold_starts - 1  # its own first boot, scaled away at once


def modal_platform(**fields: Any) -> dict[str, Any]:
    return {"kind": "modal", "app": APP, **fields}


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, *QUIET_PLUGINS, timeout=RUN_TIMEOUT)


def output(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


def usage_row(result: pytest.RunResult, name: str) -> list[str]:
    """The platform's row of the `vllm usage` table, split into cells."""
    lines = result.outlines
    start = next(i for i, line in enumerate(lines) if "vllm usage" in line)
    return next(line.split() for line in lines[start:] if line.split()[:1] == [name])


# ---------------------------------------------------------------------- locate and wake


def test_locate_wake_and_run_tests(llm_suite, emulator, write_platforms, fake_modal):
    server = emulator(cold_start=1.5, cold_style="hold", model="m-modal")
    fake_modal.urls({f"{APP}/web": server.root_url})
    write_platforms({"mod": modal_platform(function="web", environment="staging")})

    result = run(llm_suite, "--vllm-platform=mod")

    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            f"vllm: mod -> {server.base_url} model=m-modal woke in *s (cold)",
            "vllm: mod wake_timeout=900 (modal default), keep_alive=ping (modal default)*",
        ]
    )
    assert fake_modal.calls()[0] == {
        "call": "status",
        "app": APP,
        "function": "web",
        "server": None,
        "environment": "staging",
    }
    assert "deploy" not in fake_modal.names()
    assert boots(server) == 1
    assert server.stats.chat_requests == 2


def test_not_deployed_exits_4_with_the_deploy_hint(llm_suite, write_platforms, fake_modal):
    fake_modal.urls({"other-app/serve": "http://127.0.0.1:9"})
    write_platforms({"mod": modal_platform()})

    result = run(llm_suite, "--vllm-platform=mod")

    assert result.ret == 4
    text = output(result)
    assert "vllm platform 'mod'" in text
    assert "not deployed" in text
    assert "modal-vllm deploy mod" in text
    assert "--vllm-deploy" in text
    assert "Traceback" not in text
    assert fake_modal.names() == ["status"]


def test_missing_modal_credentials_exit_4_saying_how_to_authenticate(
    llm_suite, write_platforms, fake_modal, monkeypatch
):
    fake_modal.urls({f"{APP}/serve": "http://127.0.0.1:9"})
    monkeypatch.setenv("FAKE_MODAL_NO_AUTH", "1")
    write_platforms({"mod": modal_platform()})

    result = run(llm_suite, "--vllm-platform=mod")

    assert result.ret == 4
    text = output(result)
    assert "vllm platform 'mod'" in text
    assert "modal setup" in text
    assert "MODAL_TOKEN_ID" in text
    assert "MODAL_TOKEN_SECRET" in text
    assert "Traceback" not in text


# ---------------------------------------------------------------------- autoscaler keep-alive

AUTOSCALER_SUITE = """
import httpx

def test_pinned_while_the_session_runs(vllm_endpoint):
    settings = httpx.get(vllm_endpoint.root_url + "/__modal/autoscaler").json()
    assert settings["min_containers"] == 1
"""


@pytest.mark.parametrize(
    ("ending", "ret", "selected_by"),
    [
        ("passing", 0, "option"),
        ("failing", 1, "platform"),
        ("interrupted", 2, "option"),
    ],
)
def test_autoscaler_pins_one_container_and_restores_the_previous_value(
    pytester, emulator, write_platforms, fake_modal, ending, ret, selected_by
):
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url})
    extra = {"keep_alive": "autoscaler"} if selected_by == "platform" else {}
    write_platforms({"mod": modal_platform(**extra)})
    tail = {
        "passing": "",
        "failing": "\ndef test_fails():\n    assert False, 'on purpose'\n",
        "interrupted": "\ndef test_ctrl_c():\n    raise KeyboardInterrupt\n",
    }[ending]
    pytester.makepyfile(test_pin=AUTOSCALER_SUITE + tail)
    args = ["--vllm-keep-alive=autoscaler"] if selected_by == "option" else []

    result = run(pytester, "--vllm-platform=mod", *args)

    assert result.ret == ret, output(result)
    result.stdout.fnmatch_lines(["*test_pin.py .*"])  # the pinned test passed
    source = "command line" if selected_by == "option" else "platform mod"
    result.stdout.fnmatch_lines([f"vllm: mod *keep_alive=autoscaler ({source})*"])
    assert server.autoscaler()["min_containers"] == 0
    updates = [c["min_containers"] for c in fake_modal.calls() if c["call"] == "update_autoscaler"]
    assert updates == [1, 0]
    assert server.stats.health_requests <= 2  # no pings besides the wake's probe


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_autoscaler_is_restored_after_a_signal(
    pytester, emulator, write_platforms, fake_modal, signum
):
    """Ctrl-C (and SIGTERM, turned into KeyboardInterrupt while platforms run) mid-test."""
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(keep_alive="autoscaler")})
    marker = pytester.path / "test-is-running"
    pytester.makepyfile(
        test_wait=f"""
        import pathlib
        import time

        def test_waits_for_ctrl_c(vllm_endpoint):
            pathlib.Path({str(marker)!r}).write_text("running")
            time.sleep(60)
        """
    )
    process = pytester.popen(
        [sys.executable, "-m", "pytest", "--vllm-platform=mod", *QUIET_PLUGINS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), process.communicate(timeout=10)
        assert server.autoscaler()["min_containers"] == 1
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2, (stdout, stderr)
    assert b"KeyboardInterrupt" in stdout + stderr
    assert b"INTERNALERROR" not in stdout + stderr
    assert server.autoscaler()["min_containers"] == 0
    updates = [c["min_containers"] for c in fake_modal.calls() if c["call"] == "update_autoscaler"]
    assert updates == [1, 0]


# ---------------------------------------------------------------------- ping keep-alive

PING_SUITE = (
    ASK
    + """
import time

def test_first(openai_client, vllm_endpoint):
    ask(openai_client, vllm_endpoint)

def test_after_an_idle_gap(openai_client, vllm_endpoint):
    time.sleep(1.5)
    ask(openai_client, vllm_endpoint)

def test_after_another_idle_gap(openai_client, vllm_endpoint):
    time.sleep(1.5)
    ask(openai_client, vllm_endpoint)
"""
)


def test_ping_keeps_a_short_scaledown_window_warm(pytester, emulator, write_platforms, fake_modal):
    server = emulator(cold_start=0.5, cold_style="hold", scaledown_window=1.0)
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(keep_alive_interval=0.3)})
    pytester.makepyfile(test_ping=PING_SUITE)

    result = run(pytester, "--vllm-platform=mod")

    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["vllm: mod *keep_alive=ping (modal default)*"])
    assert boots(server) == 1  # the wake's boot served every test: no scale-down in between
    row = usage_row(result, "mod")
    assert row[1] == "3"  # requests
    assert int(row[-1]) > 0  # pings
    assert server.stats.health_requests >= int(row[-1])


# ---------------------------------------------------------------------- no keep-alive: re-wake

REWAKE_SUITE = (
    ASK
    + """
import time

def test_after_the_endpoint_scaled_to_zero(openai_client, vllm_endpoint):
    time.sleep(2.0)  # twice the scale-down window, with no request: the container is gone
    ask(openai_client, vllm_endpoint)
"""
)


@pytest.mark.parametrize(
    ("style", "redirect_after"),
    [("hold", None), ("hold", 0.2), ("503", None)],
    ids=["hold", "hold-303", "503"],
)
def test_without_keep_alive_a_test_after_scale_down_rewakes_the_endpoint(
    pytester, emulator, write_platforms, fake_modal, style, redirect_after
):
    server = emulator(
        cold_start=0.5, cold_style=style, scaledown_window=1.0, redirect_after=redirect_after
    )
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform()})
    pytester.makepyfile(test_rewake=REWAKE_SUITE)

    result = run(pytester, "--vllm-platform=mod", "--vllm-keep-alive=off")

    result.assert_outcomes(passed=1)
    assert boots(server) == 2  # the wake, then the re-wake after the idle gap
    assert server.stats.chat_requests == 1
    row = usage_row(result, "mod")
    assert row[1:3] == ["1", "0"]  # one request, no error
    assert row[-1] == "0"  # no pings


# ---------------------------------------------------------------------- proxy auth

SHOW_TEST = """
def test_show(vllm_endpoint, openai_client, chat_model):
    print(repr(vllm_endpoint))
    print(repr(chat_model))
    assert vllm_endpoint.headers
    assert False, repr(vllm_endpoint)
"""


def test_proxy_auth_works_and_never_leaks(
    llm_suite, emulator, write_platforms, fake_modal, monkeypatch
):
    server = emulator(proxy_auth=(PROXY_KEY, PROXY_SECRET), api_key=API_KEY)
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(proxy_auth=True, keep_alive_interval=0.2)})
    monkeypatch.setenv("MODAL_PROXY_TOKEN_ID", PROXY_KEY)
    monkeypatch.setenv("MODAL_PROXY_TOKEN_SECRET", PROXY_SECRET)
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    llm_suite.makepyfile(test_show=SHOW_TEST)

    result = run(llm_suite, "--vllm-platform=mod", "-vv", "-rA", "-l")

    result.assert_outcomes(passed=2, failed=1)
    assert server.stats.unauthorized == 0  # the wake, the pings and the clients all sent them
    assert server.stats.chat_requests >= 2
    assert "'Modal-Key': '***'" in result.stdout.str()
    assert_no_secrets(result.stdout.str(), result.stderr.str())


def test_proxy_auth_without_the_tokens_exits_4_naming_them(
    llm_suite, emulator, write_platforms, fake_modal
):
    server = emulator(proxy_auth=(PROXY_KEY, PROXY_SECRET))
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(proxy_auth=True)})

    result = run(llm_suite, "--vllm-platform=mod")

    assert result.ret == 4
    text = output(result)
    assert "MODAL_PROXY_TOKEN_ID and MODAL_PROXY_TOKEN_SECRET are not set" in text
    assert "Traceback" not in text
    assert server.stats.requests == {}  # stopped before any request
    assert fake_modal.calls() == []  # ... and before any Modal call


# ---------------------------------------------------------------------- deploy and ephemeral


ENDPOINT_TEST = """
def test_endpoint(vllm_endpoint):
    assert vllm_endpoint.model == "stub"
"""


def test_deploy_runs_before_locate_with_the_platform_settings(
    pytester, emulator, write_platforms, fake_modal
):
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url}, deployed="")  # nothing deployed yet
    deploy_env = {"MODEL_NAME": "org/model", "GPU": "L4"}
    write_platforms({"mod": modal_platform(environment="dev", deploy_env=deploy_env)})

    pytester.makepyfile(test_deployed=ENDPOINT_TEST)

    result = run(pytester, "--vllm-platform=mod", "--vllm-deploy")

    result.assert_outcomes(passed=1)
    status, deploy, located = fake_modal.calls()[:3]
    assert status["call"] == "status"  # deployed already, with these settings?
    assert deploy["call"] == "deploy"
    assert deploy["app_name"] == APP
    assert deploy["environment"] == "dev"
    assert deploy["deploy_env"] == {**deploy_env, "APP_NAME": APP}
    assert deploy["app_file"].endswith("vllm_server.py")  # the bundled app by default
    assert located == {
        "call": "status",
        "app": APP,
        "function": "serve",
        "server": None,
        "environment": "dev",
    }


EPHEMERAL_SUITE = """
import json
import os

def test_the_ephemeral_app_runs_during_the_session(vllm_endpoint):
    with open(os.environ["FAKE_MODAL_CALLS"], encoding="utf-8") as handle:
        calls = [json.loads(line)["call"] for line in handle]
    assert calls == ["ephemeral_enter"]
"""


@pytest.mark.parametrize("outcome", ["passing", "failing"])
def test_ephemeral_app_lives_exactly_as_long_as_the_session(
    pytester, emulator, write_platforms, fake_modal, outcome
):
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url}, deployed="")  # never deployed
    write_platforms({"mod": modal_platform(deploy_env={"GPU": "L4"})})
    tail = "\ndef test_fails():\n    assert False, 'on purpose'\n" if outcome == "failing" else ""
    pytester.makepyfile(test_eph=EPHEMERAL_SUITE + tail)

    result = run(pytester, "--vllm-platform=mod", "--vllm-ephemeral")

    if outcome == "failing":
        result.assert_outcomes(passed=1, failed=1)
    else:
        result.assert_outcomes(passed=1)
    enter, exit_ = fake_modal.calls()
    assert enter["call"] == "ephemeral_enter"
    assert enter["deploy_env"] == {"GPU": "L4", "APP_NAME": APP}
    assert enter["function"] == "serve"
    assert exit_["call"] == "ephemeral_exit"
    assert exit_["error"] is None
    result.stdout.fnmatch_lines([f"vllm: mod -> {server.base_url} *"])


# ---------------------------------------------------------------------- a real workspace's money


def test_a_container_that_exits_at_start_up_names_the_logs_command(
    llm_suite, emulator, write_platforms, fake_modal
):
    """The app fails fast (every boot exits); the paragraph names where the reason is."""
    server = emulator(cold_start=0.2, cold_style="hold", startup_exit="vLLM exited with code 2")
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(environment="dev", wake_timeout=3)})

    result = run(llm_suite, "--vllm-platform=mod")

    assert result.ret == 75, output(result)
    text = output(result)
    # The last answer is the boot's 500, or a probe held by the next boot at the deadline.
    assert "did not become ready within 3s (last answer: " in text
    assert "its logs: `modal app logs my-app --env dev`" in text
    assert server.stats.snapshot()["failed_boots"] >= 1


def test_a_build_error_is_a_configuration_error_even_with_unavailable_skip(
    llm_suite, emulator, write_platforms, fake_modal, monkeypatch
):
    """A typo in VLLM_VERSION must stop the run, not skip the whole suite as "unavailable"."""
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url}, deployed="")
    monkeypatch.setenv("FAKE_MODAL_RAISE", "deploy:ImageBuildError")
    write_platforms({"mod": modal_platform(deploy_env={"VLLM_VERSION": "0.99.nope"})})

    result = run(llm_suite, "--vllm-platform=mod", "--vllm-deploy", "--vllm-unavailable=skip")

    assert result.ret == 4, output(result)
    text = output(result)
    assert "failed to build" in text and "build output" in text
    assert "skipped" not in text  # the session stopped: nothing was skipped


def test_a_second_deploy_with_unchanged_settings_deploys_nothing_and_stays_warm(
    llm_suite, emulator, write_platforms, fake_modal
):
    server = emulator(cold_start=0.5, cold_style="hold", scaledown_window=60)
    fake_modal.urls({f"{APP}/serve": server.root_url}, deployed="")
    # The 60 s window must outlast the gap between the runs: with parking on, the first run
    # would leave 2 s, and a slow start of the second run would meet a cold container.
    write_platforms(
        {"mod": modal_platform(deploy_env={"MODEL_NAME": "Org/M"}, fast_scaledown=False)}
    )

    first = run(llm_suite, "--vllm-platform=mod", "--vllm-deploy")
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["vllm: mod: deployed app 'my-app'"])
    boots_after_first = server.stats.cold_starts

    second = run(llm_suite, "--vllm-platform=mod", "--vllm-deploy")

    second.assert_outcomes(passed=2)
    second.stdout.fnmatch_lines(
        [
            "vllm: mod: app 'my-app' is already deployed with these settings: not redeployed*",
            "vllm: mod -> * woke in *s (warm)",
        ]
    )
    assert fake_modal.names().count("deploy") == 1
    assert server.stats.snapshot()["deploys"] == 1
    assert server.stats.cold_starts == boots_after_first  # no cold start for the second run


def test_ephemeral_runs_show_modals_output(pytester, emulator, write_platforms, fake_modal):
    server = emulator()
    fake_modal.urls({f"{APP}/serve": server.root_url}, deployed="")
    write_platforms({"mod": modal_platform()})
    pytester.makepyfile(test_eph=ENDPOINT_TEST)

    result = run(pytester, "--vllm-platform=mod", "--vllm-ephemeral")

    result.assert_outcomes(passed=1)
    # What Modal prints while the app starts (the fake prints a line as Modal's output would)
    # reaches the terminal, not pytest's capture.
    result.stdout.fnmatch_lines(["fake Modal: building the image of my-app (ephemeral run)"])


def test_an_unreadable_min_containers_is_never_written_and_pings_keep_it_warm(
    pytester, emulator, write_platforms, fake_modal
):
    server = emulator(min_containers=2, autoscaler_unreadable=True)
    fake_modal.urls({f"{APP}/serve": server.root_url})
    write_platforms({"mod": modal_platform(keep_alive="autoscaler", keep_alive_interval=0.2)})
    pytester.makepyfile(
        test_pings="import time\n\ndef test_idle(vllm_endpoint):\n    time.sleep(1.0)\n"
    )

    result = run(pytester, "--vllm-platform=mod")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "vllm: mod: WARNING: keep-alive 'autoscaler' fell back to 'ping': its autoscaler "
            "settings could not be read*nothing was pinned"
        ]
    )
    assert "update_autoscaler" not in fake_modal.names()
    assert server.autoscaler()["min_containers"] == 2  # not "restored" to a guessed 0
    assert int(usage_row(result, "mod")[-1]) >= 2  # the ping keep-alive ran instead
