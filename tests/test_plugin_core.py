"""The core plugin path through its public surface: pytester runs over real HTTP."""

from __future__ import annotations

import json

import pytest
from conftest import API_KEY, assert_no_secrets


def test_stub_platform_runs_openai_and_chat_model_tests(llm_suite: pytest.Pytester) -> None:
    result = llm_suite.runpytest("--vllm-platform=stub", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "vllm: stub -> http://127.0.0.1:*/v1 model=stub woke in *s (warm)",
            "*= vllm usage =*",
            "stub *",
        ]
    )


def test_url_platform_woken_after_refusing_start(llm_suite, endpoint_server, write_platforms):
    server = endpoint_server(cold_start=2.0, cold_style="refuse", model="m1")
    write_platforms({"late": {"kind": "url", "base_url": server.base_url}})
    result = llm_suite.runpytest("--vllm-platform=late", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["vllm: late -> *model=m1 woke in *s (cold)"])
    header = next(line for line in result.outlines if line.startswith("vllm: late ->"))
    woke = float(header.split("woke in ")[1].split("s")[0])
    assert woke >= 1.5  # it really waited through the cold start


def test_url_platform_woken_through_held_requests(llm_suite, endpoint_server, write_platforms):
    server = endpoint_server(cold_start=2.0, cold_style="hold", scaledown_window=60)
    server.scale_to_zero()  # the first probe boots it: the hold starts with the wake
    write_platforms({"held": {"kind": "url", "base_url": server.base_url}})
    result = llm_suite.runpytest("--vllm-platform=held", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["vllm: held -> * woke in *s (cold)"])
    # A held probe is waited for, not re-sent in a loop.
    assert server.stats.requests.get("/health", 0) <= 3


def test_no_platform_skips_llm_tests_with_the_documented_reason(llm_suite: pytest.Pytester):
    llm_suite.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = llm_suite.runpytest("-rs", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*no LLM platform selected: pass --vllm-platform=NAME (known: env, local, modal-llama, "
            "modal-qwen, stub)*"
        ]
    )


def test_several_platforms_parametrize_with_ids_and_summary_rows(
    llm_suite, endpoint_server, write_platforms
):
    server = endpoint_server(model="m2")
    write_platforms({"other": {"kind": "url", "base_url": server.base_url}})
    result = llm_suite.runpytest("--vllm-platform=stub,other", "-v", "-p", "no:asyncio")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines_random(
        [
            "*test_openai?stub? PASSED*",
            "*test_openai?other? PASSED*",
            "*test_chat_model?stub? PASSED*",
            "*test_chat_model?other? PASSED*",
        ]
    )
    rows = [line.split() for line in result.outlines]
    assert any(r[:3] == ["stub", "2", "0"] for r in rows)
    assert any(r[:3] == ["other", "2", "0"] for r in rows)


def test_markers_select_platforms_and_capabilities(pytester, endpoint_server, write_platforms):
    server = endpoint_server()
    write_platforms(
        {"plain": {"kind": "url", "base_url": server.base_url, "capabilities": ["streaming"]}}
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.vllm_requires("tools")
        def test_tools(vllm_endpoint):
            assert vllm_endpoint.platform == "stub"  # the platform that has tools

        @pytest.mark.vllm_platforms("stub")
        def test_only_stub(vllm_platform):
            assert vllm_platform == "stub"
        """
    )
    result = pytester.runpytest("--vllm-platform=stub,plain", "-rs", "-p", "no:asyncio")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*platform 'plain' lacks capability tools (it has: streaming)*",
            "*runs only on stub (this run: plain)*",
        ]
    )


def test_never_ready_endpoint_exits_75_within_the_timeout(
    llm_suite, endpoint_server, write_platforms
):
    server = endpoint_server(cold_start=3600, cold_style="503")
    write_platforms({"dead": {"kind": "url", "base_url": server.base_url, "wake_timeout": 1.5}})
    result = llm_suite.runpytest_subprocess("--vllm-platform=dead")
    assert result.ret == 75
    text = result.stderr.str() + result.stdout.str()
    assert "vllm platform 'dead'" in text
    assert "did not become ready within 1.5s" in text
    assert "Fix:" in text
    assert "Traceback" not in text
    assert result.duration < 30


def test_unavailable_skip_skips_only_that_platform(llm_suite, endpoint_server, write_platforms):
    server = endpoint_server(cold_start=3600, cold_style="503")
    write_platforms({"dead": {"kind": "url", "base_url": server.base_url, "wake_timeout": 1}})
    result = llm_suite.runpytest(
        "--vllm-platform=stub,dead", "--vllm-unavailable=skip", "-rs", "-p", "no:asyncio"
    )
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*vllm platform 'dead'*did not become ready*"])


def test_wrong_key_is_a_configuration_error(
    llm_suite, endpoint_server, write_platforms, monkeypatch
):
    server = endpoint_server(api_key=API_KEY)
    write_platforms({"keyed": {"kind": "url", "base_url": server.base_url}})
    monkeypatch.setenv("VLLM_API_KEY", "sk-wrong-key")
    result = llm_suite.runpytest_subprocess("--vllm-platform=keyed")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*vllm platform 'keyed'*401*key in VLLM_API_KEY was rejected*"])


def test_missing_key_names_the_variable(llm_suite, endpoint_server, write_platforms):
    server = endpoint_server(api_key=API_KEY)
    write_platforms(
        {"keyed": {"kind": "url", "base_url": server.base_url, "api_key_env": "MY_LLM_KEY"}}
    )
    result = llm_suite.runpytest_subprocess("--vllm-platform=keyed")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*MY_LLM_KEY is not set*export MY_LLM_KEY=*"])


def test_right_key_works_and_never_leaks(
    llm_suite, endpoint_server, write_platforms, monkeypatch, tmp_path
):
    server = endpoint_server(api_key=API_KEY)
    write_platforms({"keyed": {"kind": "url", "base_url": server.base_url}})
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    llm_suite.makepyfile(
        test_show="""
        def test_show(vllm_endpoint, openai_client, chat_model):
            print(repr(vllm_endpoint), repr(chat_model))
            assert vllm_endpoint.api_key
            assert False, repr(vllm_endpoint)
    """
    )
    report = tmp_path / "report.json"
    result = llm_suite.runpytest_subprocess(
        "--vllm-platform=keyed",
        "-vv",
        "-rA",
        "-l",
        f"--vllm-report={report}",
        f"--junitxml={tmp_path / 'junit.xml'}",
    )
    result.assert_outcomes(passed=2, failed=1)
    assert_no_secrets(
        result.stdout.str(),
        result.stderr.str(),
        report.read_text(),
        (tmp_path / "junit.xml").read_text(),
    )
    assert "api_key='***'" in result.stdout.str()


def test_report_json_counts_the_requests(llm_suite, tmp_path):
    report = tmp_path / "out" / "report.json"
    result = llm_suite.runpytest(
        "--vllm-platform=stub", f"--vllm-report={report}", "-p", "no:asyncio"
    )
    result.assert_outcomes(passed=2)
    data = json.loads(report.read_text())
    (row,) = data["platforms"]
    assert row["name"] == "stub"
    assert row["model"] == "stub"
    assert row["requests"] == 2
    assert row["errors"] == 0
    assert row["prompt_tokens"] > 0
    assert row["completion_tokens"] > 0
    assert set(row["latency_ms"]) == {"p50", "p95", "max"}
    assert row["keep_alive_pings"] == 0
    assert row["cold"] is False


def test_list_platforms(pytester, write_platforms):
    write_platforms({"mine": {"kind": "url", "base_url": "http://127.0.0.1:9/v1"}})
    result = pytester.runpytest("--vllm-list-platforms")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "NAME*KIND*SOURCE*MODEL*TARGET",
            "*local*process*built-in*",
            "mine*url*pyproject.toml*http://127.0.0.1:9/v1",
        ]
    )


def test_collect_only_wakes_nothing(llm_suite, endpoint_server, write_platforms):
    server = endpoint_server()
    write_platforms({"p": {"kind": "url", "base_url": server.base_url}})
    result = llm_suite.runpytest("--vllm-platform=p", "--collect-only", "-q", "-p", "no:asyncio")
    assert result.ret == 0
    assert server.stats.requests == {}


def test_stacked_markers_combine(pytester, endpoint_server, write_platforms):
    server = endpoint_server()
    write_platforms(
        {"plain": {"kind": "url", "base_url": server.base_url, "capabilities": ["streaming"]}}
    )
    pytester.makepyfile(
        """
        import pytest
        pytestmark = pytest.mark.vllm_requires("tools")

        @pytest.mark.vllm_requires("streaming")
        def test_needs_both(vllm_endpoint):
            pass

        @pytest.mark.vllm_platforms("plain", "stub")
        @pytest.mark.vllm_platforms("stub")
        def test_only_stub_twice(vllm_platform):
            pass
        """
    )
    result = pytester.runpytest("--vllm-platform=plain", "-rs", "-p", "no:asyncio")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines_random(
        [
            "*lacks capability tools*",
            "*runs only on stub (this run: plain)*",
        ]
    )
