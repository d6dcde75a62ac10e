"""An example LangChain agent: tool calling (calculator, country facts), summaries, extraction.

Usage: `Agent(chat_model).run("What is 37 * 43?")` returns an `AgentResult` with the `answer`
and the `tool_calls` made; `summarize(chat_model, text)` and `extract_city(chat_model, text)`
are single calls. `chat_model` is any LangChain chat model with tool calling, usually a
`langchain_openai.ChatOpenAI` pointed at an OpenAI-compatible server.
"""

from .core import (
    SYSTEM_PROMPT,
    Agent,
    AgentResult,
    CityInfo,
    ToolCallRecord,
    extract_city,
    summarize,
    visible_text,
)
from .tools import FACTS, TOOLS, CalculatorError, calculator, evaluate, find_fact, lookup

__all__ = [
    "FACTS",
    "SYSTEM_PROMPT",
    "TOOLS",
    "Agent",
    "AgentResult",
    "CalculatorError",
    "CityInfo",
    "ToolCallRecord",
    "calculator",
    "evaluate",
    "extract_city",
    "find_fact",
    "lookup",
    "summarize",
    "visible_text",
]
