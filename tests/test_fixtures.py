"""The remaining public surface: async clients, streaming usage, --vllm-no-wake, the GitHub step
summary, xdist modes and the fixture docs."""

from __future__ import annotations

import json

import pytest

ASYNC_SUITE = """
import asyncio
import pytest

def test_in_asyncio_run(async_openai_client, vllm_endpoint):
    async def main():
        answer = await async_openai_client.chat.completions.create(
            model=vllm_endpoint.model, messages=[{"role": "user", "content": "a1"}])
        return answer.choices[0].message.content
    assert asyncio.run(main()) == "echo: a1"

@pytest.mark.asyncio
async def test_in_pytest_asyncio(async_openai_client, vllm_endpoint):
    stream = await async_openai_client.chat.completions.create(
        model=vllm_endpoint.model, messages=[{"role": "user", "content": "a2 b2"}],
        stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage.completion_tokens == 3

@pytest.mark.asyncio
async def test_chat_model_async(chat_model):
    assert (await chat_model.ainvoke("a3")).content == "echo: a3"

def test_chat_model_streams_usage(chat_model):
    chunks = list(chat_model.stream("s1 s2"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.content == "echo: s1 s2"
    assert total.usage_metadata["output_tokens"] == 3

def test_factory_overrides(chat_model_factory):
    model = chat_model_factory(temperature=0.5, max_tokens=1)
    assert model.temperature == 0.5
    assert model.invoke("one two three").content == "echo:"
"""


def test_async_clients_streaming_usage_and_factory(pytester, tmp_path):
    pytester.makepyfile(test_async=ASYNC_SUITE)
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        "--vllm-platform=stub",
        f"--vllm-report={report}",
        "-p",
        "asyncio",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    )
    result.assert_outcomes(passed=5)
    (row,) = json.loads(report.read_text())["platforms"]
    # Every request, async and streamed ones included, is metered.
    assert row["requests"] == 5
    assert row["completion_tokens"] == 2 + 3 + 2 + 3 + 1  # words of each stub reply


def test_no_wake_uses_the_endpoint_as_it_is(pytester, endpoint_server, write_platforms):
    server = endpoint_server(model="m")
    write_platforms({"p": {"kind": "url", "base_url": server.base_url, "model": "m"}})
    pytester.makepyfile(
        test_x="def test_x(vllm_endpoint):\n    assert vllm_endpoint.model == 'm'\n"
    )
    result = pytester.runpytest("--vllm-platform=p", "--vllm-no-wake", "-p", "no:asyncio")
    result.assert_outcomes(passed=1)
    # Not one probe: the model was known, and waking was switched off.
    assert server.stats.requests == {}
    result.stdout.fnmatch_lines(["vllm: p -> * woke in 0.0s (warm)"])


def test_github_step_summary_gets_the_table(llm_suite, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = llm_suite.runpytest_subprocess("--vllm-platform=stub", "-p", "no:asyncio")
    result.assert_outcomes(passed=2)
    text = summary.read_text()
    assert text.startswith("earlier step\n### vllm usage")
    row = next(line for line in text.splitlines() if line.startswith("| stub "))
    assert row.split("|")[2].strip() == "2"  # requests


@pytest.mark.parametrize("mode", [["-n", "auto"], ["-n", "2", "--dist", "loadgroup"]])
def test_xdist_modes(pytester, tmp_path, mode):
    pytester.makepyfile(
        test_group="""
        import pytest

        @pytest.mark.xdist_group("llm")
        @pytest.mark.parametrize("i", range(4))
        def test_x(openai_client, vllm_endpoint, i):
            openai_client.chat.completions.create(
                model=vllm_endpoint.model, messages=[{"role": "user", "content": str(i)}])
        """
    )
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        *mode, "--vllm-platform=stub", f"--vllm-report={report}", "-p", "no:asyncio"
    )
    result.assert_outcomes(passed=4)
    assert json.loads(report.read_text())["platforms"][0]["requests"] == 4


def test_fixture_docs_stand_alone(pytester):
    result = pytester.runpytest("--fixtures", "-p", "no:asyncio")
    text = result.stdout.str()
    for name in (
        "vllm_platform",
        "vllm_endpoint",
        "openai_client",
        "async_openai_client",
        "chat_model",
        "chat_model_factory",
    ):
        assert f"{name} [" in text or f"{name} --" in text or f"\n{name}" in text, name
    result.stdout.fnmatch_lines(
        [
            "*openai_client*",
            "*An `openai.OpenAI` client bound to the woken endpoint (session-scoped).*",
        ]
    )
