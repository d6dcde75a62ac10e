"""A small tool-using agent, a summarizer and a structured extractor, on any LangChain chat model.

The agent is a plain tool-calling loop: ask the model (with the tools bound); if it asks for
tools, run them and send the results back; stop when it answers in text or after `max_steps`
model calls. Nothing here knows which server is behind the chat model: the tests hand in a
`ChatOpenAI` bound to a stub, a local llama.cpp model or vLLM on Modal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field

from .tools import TOOLS

SYSTEM_PROMPT = (
    "You are a helpful assistant with two tools. "
    "Use the calculator tool for all arithmetic, even easy sums, instead of working it out "
    "yourself. Use the lookup tool for facts about countries (capitals, populations) instead "
    "of answering from memory. After the tools answer, reply briefly and include their result."
)

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def visible_text(message: BaseMessage) -> str:
    """The text of a reply, without reasoning blocks (`<think>...</think>`, as Qwen3 writes)."""
    content = message.content
    if isinstance(content, list):  # content blocks
        content = "".join(
            block if isinstance(block, str) else str(block.get("text", "")) for block in content
        )
    text = _THINK.sub("", content)
    if "</think>" in text:  # the chat template opened the block, the reply only closes it
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:  # cut off (max_tokens) while still thinking
        text = text.split("<think>", 1)[0]
    return text.strip()


@dataclass(frozen=True)
class ToolCallRecord:
    """One tool call the model made, and what the tool answered."""

    name: str
    args: dict[str, Any]
    result: str


@dataclass
class AgentResult:
    """What `Agent.run` returns: the answer and how the agent got there."""

    answer: str
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    messages: list[BaseMessage] = field(default_factory=list)
    steps: int = 0
    """Model calls made."""
    finished: bool = True
    """False when `max_steps` ran out before the model answered in text."""

    @property
    def tool_names(self) -> list[str]:
        return [call.name for call in self.tool_calls]


class Agent:
    """Answers questions with the calculator and lookup tools (or any tools you give it)."""

    def __init__(
        self,
        chat_model: BaseChatModel,
        tools: list[BaseTool] | None = None,
        *,
        system_prompt: str = SYSTEM_PROMPT,
        max_steps: int = 5,
    ) -> None:
        self.tools = {t.name: t for t in (tools if tools is not None else TOOLS)}
        self.model = chat_model.bind_tools(list(self.tools.values()))
        self.system_prompt = system_prompt
        self.max_steps = max_steps

    def run(self, question: str) -> AgentResult:
        """Answer one question; the result carries the tool calls and the whole conversation."""
        messages: list[BaseMessage] = [
            SystemMessage(self.system_prompt),
            HumanMessage(question),
        ]
        result = AgentResult(answer="", messages=messages)
        for _ in range(self.max_steps):
            reply = self.model.invoke(messages)
            result.steps += 1
            messages.append(reply)
            if not isinstance(reply, AIMessage) or not (
                reply.tool_calls or reply.invalid_tool_calls
            ):
                result.answer = visible_text(reply)
                return result
            for call in reply.tool_calls:
                output = self._run_tool(call["name"], call["args"])
                result.tool_calls.append(ToolCallRecord(call["name"], call["args"], output))
                messages.append(ToolMessage(output, tool_call_id=call["id"], name=call["name"]))
            for bad in reply.invalid_tool_calls:
                # Arguments that are not valid JSON: tell the model, as a tool result.
                output = f"error: the arguments are not valid JSON: {bad.get('error') or ''}"
                messages.append(
                    ToolMessage(output, tool_call_id=bad.get("id") or "", status="error")
                )
        result.finished = False
        return result

    def _run_tool(self, name: str, args: dict[str, Any]) -> str:
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool named {name!r}; tools: {', '.join(self.tools)}"
        try:
            return str(tool.invoke(args))
        except Exception as error:  # bad arguments (validation) go back to the model
            return f"error: {type(error).__name__}: {error}"


# ------------------------------------------------------------------------------ summarize


def summarize(chat_model: BaseChatModel, text: str, *, sentences: int = 1) -> str:
    """A short summary of `text` (plain chat, no tools)."""
    plural = "sentence" if sentences == 1 else "sentences"
    prompt = f"Summarize the following text in {sentences} {plural}.\n\n{text}"
    return visible_text(chat_model.invoke([HumanMessage(prompt)]))


# ------------------------------------------------------------------------------ extract_city


class CityInfo(BaseModel):
    """A city mentioned in a text."""

    city: str = Field(description="The city's name", min_length=1, max_length=60)
    country: str = Field(description="The country the city is in", min_length=1, max_length=60)
    is_capital: bool = Field(description="Whether the city is its country's capital")


def extract_city(chat_model: BaseChatModel, text: str) -> dict[str, Any]:
    """The city a text is about, as a dict that validates against `CityInfo`.

    Uses the server's structured output (`response_format` with a JSON schema), so the reply is
    constrained to the schema rather than parsed out of free text.
    """
    extractor = chat_model.with_structured_output(CityInfo, method="json_schema")
    prompt = (
        "Which city is this text about? Give the city, its country, and whether it is the "
        f"country's capital.\n\n{text}"
    )
    found = extractor.invoke([HumanMessage(prompt)])
    if not isinstance(found, CityInfo):
        raise TypeError(f"expected CityInfo from the structured output, got {found!r}")
    return found.model_dump()
