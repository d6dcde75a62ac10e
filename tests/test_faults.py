"""The fault matrix: each case is a real fault of a real server on loopback, run through pytest.

`FAULTS` is also the source of the fault table in docs/reliability.md (see
tests/test_reliability_doc.py), so the documentation cannot drift from what is tested.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import stub_command
from modal_emulator import ModalEmulator


@dataclass(frozen=True)
class Fault:
    """One row of the fault matrix."""

    id: str
    fault: str
    behaviour: str
    exit_code: int


FAULTS = [
    Fault(
        "scale-to-zero",
        "endpoint scales to zero mid-session (idle gap > window)",
        "the next request waits through a re-wake; tests pass",
        0,
    ),
    Fault("flaky-503", "20% of requests answered 503", "retried; every test passes", 0),
    Fault(
        "flaky-reset", "20% of connections reset without an answer", "retried; every test passes", 0
    ),
    Fault(
        "dies-mid-session",
        "endpoint dies for good after the first test",
        "one re-wake (bounded by the wake timeout), then the remaining tests fail at once "
        "with the cause",
        1,
    ),
    Fault(
        "process-crash",
        "process server exits during the wake",
        "fails at once with the exit code and the log tail",
        75,
    ),
    Fault(
        "process-killed",
        "process server killed (SIGKILL) after the first test",
        "the next request fails at once with the exit code and the log tail, not after the "
        "wake timeout; the remaining tests fail at once",
        1,
    ),
    Fault("slow-under-timeout", "responses take 80% of the client timeout", "tests pass", 0),
    Fault(
        "slow-over-timeout",
        "responses take longer than the client timeout",
        "the test fails with the client's timeout error, not a hang",
        1,
    ),
    Fault(
        "redirect-chain",
        "requests held past the limit get 303 to a result URL, repeatedly",
        "the wake and the requests follow the redirects; tests pass",
        0,
    ),
    Fault("dns", "host name does not resolve", "stops at once as unreachable", 75),
    Fault("tls", "https URL to a plain-HTTP server", "stops at once: TLS error, check the URL", 4),
    Fault(
        "hung-health",
        "/health accepts and never answers",
        "gives up at the wake deadline with the last answer",
        75,
    ),
]
FAULT_IDS = [fault.id for fault in FAULTS]

CHAT_TEST = """
import time
def test_{n}(openai_client, vllm_endpoint):
    time.sleep({sleep})
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, messages=[{{"role": "user", "content": "t{n}"}}]
    )
    assert answer.choices[0].message.content == "echo: t{n}"
"""


def chat_suite(pytester: pytest.Pytester, count: int, sleep: float = 0.0) -> None:
    pytester.makepyfile(
        test_faults="\n".join(CHAT_TEST.format(n=n, sleep=sleep) for n in range(count))
    )


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:cacheprovider", *args)


KILL_SERVER = """
import os, signal, socket, time
from pathlib import Path

def test_0_kill(vllm_endpoint):
    pids = [
        int(p.name) for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"{marker}" in (p / "cmdline").read_bytes()
    ]
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    port = int(vllm_endpoint.base_url.rsplit(":", 1)[1].split("/")[0])
    for _ in range(250):  # until the server refuses connections
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)):
                break
        time.sleep(0.02)
"""


def killed_process_suite(pytester: pytest.Pytester, write_platforms: Callable[..., None]) -> None:
    """A process platform whose server a test kills after test_0 (its model name is the marker
    that finds it in /proc); a 300 s wake timeout that a fast failure must not wait out."""
    marker = f"victim-{pytester.path.name}"
    write_platforms(
        {"p": {"kind": "process", "model": marker, "command": stub_command(), "wake_timeout": 300}}
    )
    chat_suite(pytester, 4)
    suite = pytester.path.joinpath("test_faults.py")
    kill = KILL_SERVER.replace("{marker}", marker)
    suite.write_text(suite.read_text().replace("def test_1(", kill + "\n\ndef test_1("))


def assert_killed_process_failed_fast(result: pytest.RunResult, output: str, cause: str) -> None:
    """test_1 fails at once with the cause; test_2 and test_3 fail in setup, at once."""
    result.assert_outcomes(passed=2, failed=1, errors=2)
    result.stdout.fnmatch_lines(["*LLM platform 'p' is down*"])
    assert "the server process died while waking" in output
    assert cause in output
    assert "stub server ready at" in output  # the log tail of the process
    assert result.duration < 120  # at once, not after the 300 s wake timeout


def test_a_killed_process_fails_fast_under_xdist_too(pytester, write_platforms) -> None:
    """A worker is not the server's parent: it sees the death through the process watch."""
    killed_process_suite(pytester, write_platforms)
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-p", "no:cacheprovider", "--vllm-platform=p", "-n", "1"
    )
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == 1, output
    assert_killed_process_failed_fast(result, output, "exited")


def url_platform(
    write_platforms: Callable[..., None], server: ModalEmulator, **fields: Any
) -> None:
    write_platforms({"p": {"kind": "url", "base_url": server.base_url, **fields}})


@pytest.mark.parametrize("case", FAULTS, ids=FAULT_IDS)
def test_fault(case: Fault, pytester, endpoint_server, write_platforms, tmp_path) -> None:
    report = tmp_path / "report.json"
    args = ["--vllm-platform=p", f"--vllm-report={report}"]
    server: ModalEmulator | None = None
    if case.id == "scale-to-zero":
        server = endpoint_server(cold_start=0.5, cold_style="hold", scaledown_window=0.8)
        url_platform(write_platforms, server)
        chat_suite(pytester, 3, sleep=1.2)
    elif case.id in ("flaky-503", "flaky-reset"):
        mode = case.id.split("-")[1]
        server = endpoint_server(fail_rate=0.2, fail_mode=mode, seed=7)
        url_platform(write_platforms, server)
        chat_suite(pytester, 20)
    elif case.id == "dies-mid-session":
        server = endpoint_server()
        url_platform(write_platforms, server, wake_timeout=2.0)
        chat_suite(pytester, 5)
        # After test_0, a test drops a file; a thread here (the server lives in this process)
        # sees it and kills the server for good.
        suite = pytester.path.joinpath("test_faults.py")
        kill = (
            "def test_0_kill():\n"
            f"    open({str(tmp_path / 'kill')!r}, 'w').close()\n"
            "    import socket, time\n"
            "    for _ in range(250):  # until the server refuses connections\n"
            f"        with socket.socket() as s:\n"
            f"            if s.connect_ex(('127.0.0.1', {server.port})):\n"
            "                break\n"
            "        time.sleep(0.02)\n\n"
        )
        suite.write_text(suite.read_text().replace("def test_1(", kill + "def test_1("))
    elif case.id == "process-crash":
        write_platforms(
            {
                "p": {
                    "kind": "process",
                    "command": [
                        sys.executable,
                        "-c",
                        "import sys; print('loading weights'); "
                        "print('error: out of memory', flush=True); sys.exit(3)",
                    ],
                    "wake_timeout": 60,
                }
            }
        )
        chat_suite(pytester, 1)
    elif case.id == "process-killed":
        killed_process_suite(pytester, write_platforms)
    elif case.id.startswith("slow"):
        delay = 0.8 if case.id == "slow-under-timeout" else 3.0
        server = endpoint_server(response_delay=delay)
        url_platform(
            write_platforms, server, client={"timeout": 1.0 if delay < 1 else 1.5, "max_retries": 0}
        )
        chat_suite(pytester, 1)
    elif case.id == "redirect-chain":
        # Long enough to outlast the start-up of the pytest subprocess.
        server = endpoint_server(cold_start=6.0, cold_style="hold", redirect_after=0.5)
        url_platform(write_platforms, server)
        chat_suite(pytester, 2)
    elif case.id == "dns":
        write_platforms({"p": {"kind": "url", "base_url": "http://llm.nonexistent.invalid/v1"}})
        chat_suite(pytester, 1)
    elif case.id == "tls":
        server = endpoint_server()
        write_platforms(
            {"p": {"kind": "url", "base_url": server.base_url.replace("http:", "https:")}}
        )
        chat_suite(pytester, 1)
    elif case.id == "hung-health":
        server = endpoint_server(health_hang=True)
        url_platform(write_platforms, server, wake_timeout=1.5)
        chat_suite(pytester, 1)

    if case.id == "dies-mid-session":
        import threading

        kill_file = tmp_path / "kill"

        def killer() -> None:
            import time

            while not kill_file.exists():
                time.sleep(0.02)
            assert server is not None
            server.die()

        threading.Thread(target=killer, daemon=True).start()

    result = run(pytester, *args)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == case.exit_code, output
    assert "Traceback" not in result.stderr.str()
    assert "INTERNALERROR" not in output

    if case.id == "scale-to-zero":
        result.assert_outcomes(passed=3)
        assert server is not None and server.stats.cold_starts >= 2
    elif case.id in ("flaky-503", "flaky-reset"):
        result.assert_outcomes(passed=20)
        assert server is not None and server.stats.injected_failures >= 1
        row = json.loads(report.read_text())["platforms"][0]
        assert row["requests"] >= 20
    elif case.id == "dies-mid-session":
        # test_1 meets the dead endpoint and waits one re-wake; the rest fail in setup, at once.
        result.assert_outcomes(passed=2, failed=1, errors=3)
        result.stdout.fnmatch_lines(["*LLM platform 'p' is down*"])
        # One re-wake of at most the wake timeout, not one per test.
        assert result.duration < 2.0 + 15.0
        assert output.count("did not become ready") >= 1
    elif case.id == "process-crash":
        assert "exit code 3" in output
        assert "error: out of memory" in output
        assert result.duration < 30  # at once, not after the 60 s wake timeout
    elif case.id == "process-killed":
        assert_killed_process_failed_fast(result, output, "exit code -9")
    elif case.id == "slow-under-timeout":
        result.assert_outcomes(passed=1)
    elif case.id == "slow-over-timeout":
        result.assert_outcomes(failed=1)
        assert "APITimeoutError" in output or "timed out" in output
    elif case.id == "redirect-chain":
        result.assert_outcomes(passed=2)
        assert server is not None and server.stats.redirects >= 1
    elif case.id == "dns":
        assert "does not resolve" in output
        assert result.duration < 30
    elif case.id == "tls":
        assert "TLS" in output
    elif case.id == "hung-health":
        assert "did not become ready within 1.5s" in output
        assert result.duration < 30
