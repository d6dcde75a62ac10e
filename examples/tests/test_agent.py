"""The agent's tool use, on platforms whose server does tool calling.

`@pytest.mark.vllm_requires("tools")` skips these where the platform does not declare the
`tools` capability (the `local` 135M model). The assertions hold for any competent model:
which tools were called, that their arguments are valid JSON matching the tool's schema, that
the answer is text and carries the tool's result. Exact wording is checked only on the scripted
`stub-agent` platform, where the whole flow is deterministic.
"""

from __future__ import annotations

import json
import re
from functools import reduce

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI
from pytest_modal_vllm import Endpoint

from agent import SYSTEM_PROMPT, TOOLS, Agent, AgentResult, ToolCallRecord

TOOL_NAMES = {tool.name for tool in TOOLS}
SCHEMAS = {tool.name: tool.args_schema for tool in TOOLS}


def plain_numbers(text: str) -> str:
    """`1,603` and `1 603` -> `1603`: models format large numbers in many ways."""
    return re.sub(r"(?<=\d)[,\u202f\u00a0 ](?=\d{3}\b)", "", text)


def assert_well_formed(result: AgentResult) -> None:
    """What every run must satisfy, whatever the model: finished, text answer, valid calls."""
    assert result.finished, f"no answer after {result.steps} model calls"
    assert isinstance(result.answer, str)
    assert result.answer.strip()
    for message in result.messages:
        if isinstance(message, AIMessage):
            assert not message.invalid_tool_calls, message.invalid_tool_calls
    for call in result.tool_calls:
        assert call.name in TOOL_NAMES
        SCHEMAS[call.name].model_validate(call.args)  # type: ignore[union-attr]
    # A model may make a mistake and recover (the tool's error goes back to it), not fail always.
    if result.tool_calls:
        assert any(not call.result.startswith("error:") for call in result.tool_calls)


pytestmark = pytest.mark.vllm_requires("tools")


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        ("What is 37 * 43 + 12?", "1603"),
        ("Calculate 3847 * 2961", "11390967"),
        ("What is (2 + 3) ** 4 - 25?", "600"),
    ],
)
def test_arithmetic_uses_the_calculator(agent: Agent, question: str, expected: str) -> None:
    result = agent.run(question)
    assert_well_formed(result)
    assert "calculator" in result.tool_names
    assert any(call.result == expected for call in result.tool_calls if call.name == "calculator")
    assert expected in plain_numbers(result.answer)


@pytest.mark.parametrize(
    ("question", "country", "expected"),
    [
        ("What is the capital of Kenya?", "kenya", "Nairobi"),
        ("What is the capital of Australia?", "australia", "Canberra"),
    ],
)
def test_fact_questions_use_lookup(
    agent: Agent, question: str, country: str, expected: str
) -> None:
    result = agent.run(question)
    assert_well_formed(result)
    lookups = [call for call in result.tool_calls if call.name == "lookup"]
    assert lookups, f"lookup was not called: {result.tool_names}"
    assert any(country in call.args["topic"].lower() for call in lookups)
    assert any(expected in call.result for call in lookups)
    assert expected in result.answer


def test_population_question_uses_lookup(agent: Agent) -> None:
    result = agent.run("How many people live in Japan? Use the lookup tool.")
    assert_well_formed(result)
    assert "lookup" in result.tool_names


def test_raw_tool_call_arguments_are_json(
    openai_client: openai.OpenAI, vllm_endpoint: Endpoint
) -> None:
    """The same, one level down: the wire format the server produces for a tool call."""
    reply = openai_client.chat.completions.create(
        model=vllm_endpoint.model,
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "What is 4817 * 2963?"},
        ],
        tools=[convert_to_openai_tool(tool) for tool in TOOLS],
        tool_choice="auto",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls
    for call in calls:
        assert call.id
        assert call.function.name == "calculator"
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments, dict)
        assert isinstance(arguments["expression"], str)


@pytest.mark.vllm_requires("tools", "streaming")
def test_streamed_tool_call_assembles(chat_model: ChatOpenAI) -> None:
    model = chat_model.bind_tools(TOOLS)
    chunks = list(model.stream([SystemMessage(SYSTEM_PROMPT), HumanMessage("What is 8231 * 47?")]))
    assert len(chunks) > 1
    merged = reduce(lambda a, b: a + b, chunks)
    assert isinstance(merged, AIMessageChunk)
    assert not merged.invalid_tool_calls
    assert [call["name"] for call in merged.tool_calls] == ["calculator"]
    SCHEMAS["calculator"].model_validate(merged.tool_calls[0]["args"])  # type: ignore[union-attr]
    assert merged.usage_metadata is not None
    assert merged.usage_metadata["output_tokens"] > 0


# ------------------------------------------------------------- the scripted flow, exactly


@pytest.mark.vllm_platforms("stub-agent")
@pytest.mark.parametrize(
    ("question", "calls", "answer"),
    [
        (
            "What is 37 * 43 + 12?",
            [ToolCallRecord("calculator", {"expression": "37 * 43 + 12"}, "1603")],
            "The result is 1603.",
        ),
        (
            "What is the capital of Kenya?",
            [
                ToolCallRecord(
                    "lookup", {"topic": "capital of Kenya"}, "The capital of Kenya is Nairobi."
                )
            ],
            "According to my lookup: The capital of Kenya is Nairobi.",
        ),
        (
            "What is 1 / 0?",
            [ToolCallRecord("calculator", {"expression": "1 / 0"}, "error: division by zero")],
            "Sorry, I could not answer that: error: division by zero",
        ),
        ("Hello there", [], "echo: Hello there"),
    ],
)
def test_scripted_tool_sequence(
    agent: Agent, question: str, calls: list[ToolCallRecord], answer: str
) -> None:
    result = agent.run(question)
    assert result.tool_calls == calls
    assert result.answer == answer
    assert result.steps == len(calls) + 1
    assert result.finished
