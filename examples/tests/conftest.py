"""Fixtures of the example suite.

The LLM fixtures (`chat_model`, `chat_model_factory`, `openai_client`, `vllm_endpoint`) come
from the pytest-modal-vllm plugin and are bound to the platform chosen with
`--vllm-platform`. Without one, the tests that use them are skipped and only the plain unit
tests of the tools run.
"""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI

from agent import Agent


@pytest.fixture
def agent(chat_model: ChatOpenAI) -> Agent:
    """The example agent on the selected platform's chat model (temperature 0)."""
    return Agent(chat_model, max_steps=6)
