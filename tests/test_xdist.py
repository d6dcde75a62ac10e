"""pytest-xdist: the controller alone wakes and keeps alive; workers' usage is merged."""

from __future__ import annotations

import json

import pytest

SUITE = """
import time
import pytest

@pytest.mark.parametrize("i", range(6))
def test_chat(openai_client, vllm_endpoint, i):
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, messages=[{"role": "user", "content": f"n {i}"}]
    )
    assert answer.choices[0].message.content == f"echo: n {i}"
    time.sleep(0.2)
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_one_wake_one_keepalive_loop_and_merged_usage(
    pytester, endpoint_server, write_platforms, tmp_path, workers
):
    server = endpoint_server(cold_start=1.0, cold_style="503")
    write_platforms(
        {
            "p": {
                "kind": "url",
                "base_url": server.base_url,
                "keep_alive": "ping",
                "keep_alive_interval": 0.25,
            }
        }
    )
    pytester.makepyfile(test_suite=SUITE)
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        "-n", workers, "--vllm-platform=p", f"--vllm-report={report}", "-p", "no:asyncio"
    )
    result.assert_outcomes(passed=6)
    (row,) = json.loads(report.read_text())["platforms"]
    # Usage from every worker is merged, and equals what the server saw.
    assert row["requests"] == 6
    assert server.stats.chat_requests == 6
    assert row["prompt_tokens"] == server.stats.prompt_tokens
    assert row["completion_tokens"] == server.stats.completion_tokens
    # One wake sequence: a single successful /v1/models probe (workers never probe).
    assert server.stats.requests.get("/v1/models", 0) == 1
    # One keep-alive loop: every /health the server saw after the wake is a ping the
    # controller counted (a second loop in a worker would add uncounted pings).
    wake_probes = server.stats.requests["/health"] - row["keep_alive_pings"]
    assert row["keep_alive_pings"] >= 1
    assert 1 <= wake_probes <= 30


def test_two_platforms_wake_concurrently(pytester, endpoint_server, write_platforms, tmp_path):
    # Both endpoints start their 3 s cold start together. Woken one after the other, the
    # second would find its endpoint ready and report ~0 s; woken together, both wait ~3 s.
    first = endpoint_server(cold_start=3.0, cold_style="refuse")
    second = endpoint_server(cold_start=3.0, cold_style="hold")
    write_platforms(
        {
            "a": {"kind": "url", "base_url": first.base_url},
            "b": {"kind": "url", "base_url": second.base_url},
        }
    )
    pytester.makepyfile(
        test_x="def test_x(vllm_endpoint):\n    assert vllm_endpoint.model == 'stub'\n"
    )
    report = tmp_path / "report.json"
    result = pytester.runpytest(
        "-n", "2", "--vllm-platform=a,b", f"--vllm-report={report}", "-p", "no:asyncio", "-v"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(["*PASSED*test_x?a?*", "*PASSED*test_x?b?*"])
    rows = {row["name"]: row for row in json.loads(report.read_text())["platforms"]}
    assert rows["a"]["cold"] and rows["b"]["cold"]
    assert rows["a"]["wake_seconds"] >= 2.0
    assert rows["b"]["wake_seconds"] >= 2.0


def test_process_server_started_once_under_xdist_and_gone_after(pytester, write_platforms):
    import uuid

    from conftest import processes_with, stub_command

    marker = f"xdist-{uuid.uuid4().hex[:10]}"
    write_platforms(
        {
            "proc": {
                "kind": "process",
                "model": marker,
                "command": stub_command(),
            }
        }
    )
    pytester.makepyfile(
        test_proc=f"""
        import pytest
        from conftest_helpers import count

        @pytest.mark.parametrize("i", range(4))
        def test_one_server(vllm_endpoint, i):
            assert count({marker!r}) == 1
        """,
        conftest_helpers="""
        from pathlib import Path

        def count(token):
            found = 0
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        cmdline = (entry / "cmdline").read_bytes()
                    except OSError:
                        continue
                    found += token.encode() in cmdline and b"modal_emulator.py" in cmdline
            return found
        """,
    )
    result = pytester.runpytest_subprocess("-n", "2", "--vllm-platform=proc", "-p", "no:asyncio")
    result.assert_outcomes(passed=4)
    assert processes_with(marker) == []
