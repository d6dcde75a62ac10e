"""The baseline the recipe is measured against: the same standard suite with `ChatOpenAI` set
up by hand, as one would without the plugin (base URL, key and model only; every flag at
langchain-tests' defaults).

Not collected by default (its name does not start with `test_`); the benchmark
(benchmarks/langchain_standard.py) and the vLLM CPU tier name it on the command line, next to
test_standard_chat.py, so that both run in one session against the same server. The address
comes from `current_endpoint()` only because the server's port is chosen at start-up: a user
would paste it.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from langchain_tests.integration_tests import ChatModelIntegrationTests
from pytest_modal_vllm import current_endpoint


class TestHandConfiguredChatOpenAI(ChatModelIntegrationTests):
    """`ChatOpenAI(base_url=..., api_key=..., model=...)`, nothing else."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        endpoint = current_endpoint()
        return {
            "base_url": endpoint.base_url,
            "api_key": endpoint.api_key or "none",
            "model": endpoint.model,
        }
