"""The LangChain standard-suite recipe (examples/langchain_standard/) on scripted stub platforms.

Run as users run it: `pytest --vllm-platform=NAME` in the recipe's folder, in a subprocess, with
a JUnit XML report read per test. The counts and the named tests below change if the wiring
breaks: the model not built by the plugin, `chat_model_params` not reaching the endpoint
(`test_stop_sequence` builds its own model), or the flags not following `capabilities`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "langchain_standard"

# Tests whose outcome depends on the wiring (tool calls, JSON mode, streamed usage, structured
# output, a model the suite builds itself, the metered async clients).
WIRED = (
    "test_invoke",
    "test_ainvoke",
    "test_astream[model0]",
    "test_stop_sequence",
    "test_usage_metadata",
    "test_usage_metadata_streaming",
    "test_structured_output[json_schema]",
    "test_structured_output_async[pydantic]",
)
TOOLS = (
    "test_tool_calling[model0]",
    "test_tool_calling_async",
    "test_tool_choice",
    "test_agent_loop[model0]",
    "test_unicode_tool_call_integration",
)
# Skipped whatever the platform: inputs no platform declares, the model override, VCR.
ALWAYS_SKIPPED = {
    "test_pdf_inputs",
    "test_audio_inputs",
    "test_image_inputs",
    "test_image_tool_message",
    "test_pdf_tool_message",
    "test_anthropic_inputs",
    "test_stream_time",
    "test_invoke_with_model_override",
    "test_ainvoke_with_model_override",
    "test_stream_with_model_override",
    "test_astream_with_model_override",
}


def run_recipe(tmp_path: Path, *args: str) -> tuple[dict[str, tuple[str, str]], str]:
    """Run the recipe; {test name: (outcome, message)} and the output."""
    report = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", *args],
        cwd=RECIPE,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = done.stdout + done.stderr
    assert report.exists(), output[-3000:]
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, child.get("message", "")
        outcomes[case.get("name", "")] = (outcome, message)
    return outcomes, output


def count(outcomes: dict[str, tuple[str, str]], outcome: str) -> int:
    return sum(1 for found, _ in outcomes.values() if found == outcome)


def test_the_recipe_on_the_scripted_platform_passes_everything_it_can(tmp_path: Path) -> None:
    outcomes, output = run_recipe(tmp_path, "--vllm-platform=stub-langchain")
    failed = {name: msg for name, (found, msg) in outcomes.items() if found in ("failure", "error")}
    assert not failed, output[-4000:]
    skipped = {name for name, (found, _) in outcomes.items() if found == "skipped"}
    assert skipped == ALWAYS_SKIPPED, output[-2000:]
    for name in (*WIRED, *TOOLS, "test_json_mode", "test_no_overrides_DO_NOT_OVERRIDE"):
        assert outcomes[name][0] == "passed", name
    # langchain-tests 1.1.9: 39 passed, 11 skipped (older versions have fewer tests).
    assert count(outcomes, "passed") >= 35
    # Every model talked through the plugin's metered clients.
    assert "stub-langchain " in output and "vllm usage" in output


def test_the_flags_follow_the_platform_capabilities_in_xdist_workers(tmp_path: Path) -> None:
    """A platform that declares only `streaming`: the tool, structured-output and JSON-mode
    tests are skipped by the suite's own flags, the rest still passes (in xdist workers)."""
    config = tmp_path / "platforms.toml"
    config.write_text('[platforms.plain]\nkind = "stub"\ncapabilities = ["streaming"]\n')
    outcomes, output = run_recipe(
        tmp_path, f"--vllm-config={config}", "--vllm-platform=plain", "-n", "2"
    )
    assert count(outcomes, "failure") + count(outcomes, "error") == 0, output[-4000:]
    for name in TOOLS:  # "Test requires tool calling." / "... tool choice." / "... support."
        found, message = outcomes[name]
        assert found == "skipped" and message.startswith("Test requires tool"), (name, message)
    assert outcomes["test_json_mode"] == ("skipped", "Test requires json mode support.")
    assert outcomes["test_structured_output[json_schema]"] == (
        "skipped",
        "Test requires structured output.",
    )
    for name in WIRED[:6]:
        assert outcomes[name][0] == "passed", name
    assert count(outcomes, "passed") < 35 <= count(outcomes, "passed") + count(outcomes, "skipped")


def test_without_a_platform_the_model_tests_skip_with_the_plugins_reason(tmp_path: Path) -> None:
    outcomes, output = run_recipe(tmp_path)
    assert outcomes["test_no_overrides_DO_NOT_OVERRIDE"][0] == "passed"
    others = {name: msg for name, (found, msg) in outcomes.items() if "DO_NOT" not in name}
    assert others and all(
        "no LLM platform selected: pass --vllm-platform=NAME" in msg for msg in others.values()
    ), output[-2000:]
