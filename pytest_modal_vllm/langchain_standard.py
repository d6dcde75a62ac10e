"""LangChain's standard chat-model suite (`langchain-tests`) against the selected platform.

    from pytest_modal_vllm.langchain_standard import PlatformChatModelTests

    class TestPlatformChatModel(PlatformChatModelTests):
        pass

    $ pytest --vllm-platform=NAME

`PlatformChatModelTests` is `langchain_tests.integration_tests.ChatModelIntegrationTests` with
the model, its parameters and the capability flags taken from the platform of the running test:

- every model, the suite's `model` fixture and the ones it builds itself from
  `chat_model_params` (`test_stop_sequence`), is the plugin's own `ChatOpenAI`: base URL, model,
  key, the platform's client defaults (`temperature=0`, `stream_usage=True`, `client` table) and
  the metered HTTP clients that wait through a cold start;
- the flags follow the platform's `capabilities`: `tools` (the model chooses tools) or
  `tool_choice` (forced calls work: `tool_choice="required"` or a named function) turn on
  `has_tool_calling` and `has_tool_choice`; `json_schema` (or a tool capability)
  `has_structured_output`, with `structured_output_kwargs` `method="json_schema"` (else
  `"function_calling"`); `json_schema` or `json_mode` `supports_json_mode` (vLLM's structured
  outputs serve both); `streaming` (the plugin's "streams with usage")
  `returns_usage_metadata`. Image, audio and PDF inputs stay off;
- without a platform, the tests that need a model are skipped with the fixtures' reason; with
  several, each runs once per platform (`[NAME]` in its id).

Importing this module imports `langchain_tests` (`pip install langchain-tests`); the plugin
itself never imports it. Override any flag in the subclass as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from .current import chat_model_kwargs, current_capabilities

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from .endpoint import Endpoint


#: Either means the server makes tool calls: `tools` by the model's own choice, `tool_choice`
#: when forced.
TOOL_CAPABILITIES = frozenset({"tools", "tool_choice"})


class PlatformChatModelTests(ChatModelIntegrationTests):
    """`ChatModelIntegrationTests` on the platform chosen with `--vllm-platform`."""

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        """LangChain's `ChatOpenAI` (vLLM and the other platforms speak the OpenAI API)."""
        from langchain_openai import ChatOpenAI

        return ChatOpenAI

    @property
    def chat_model_params(self) -> dict[str, Any]:
        """The plugin's `ChatOpenAI` arguments for the running test's platform (fresh clients)."""
        return chat_model_kwargs()

    @pytest.fixture
    def model(self, request: pytest.FixtureRequest, vllm_endpoint: Endpoint) -> BaseChatModel:
        """The suite's model, on the platform of this test (skipped without one, as the
        plugin's fixtures are); `request.param` carries the suite's per-test extras."""
        extra = getattr(request, "param", None) or {}
        params = {**self.standard_chat_model_params, **self.chat_model_params, **extra}
        return self.chat_model_class(**params)

    # ------------------------------------------------------------ capability flags

    @property
    def _capabilities(self) -> tuple[str, ...]:
        return current_capabilities()

    @property
    def has_tool_calling(self) -> bool:
        """The platform declares `tools` or `tool_choice`."""
        return bool(TOOL_CAPABILITIES & set(self._capabilities))

    @property
    def has_tool_choice(self) -> bool:
        """The platform declares `tools` or `tool_choice` (vLLM honours `required` and a named
        function)."""
        return bool(TOOL_CAPABILITIES & set(self._capabilities))

    @property
    def has_structured_output(self) -> bool:
        """The platform declares `json_schema`, `tools` or `tool_choice`."""
        return bool({"json_schema", *TOOL_CAPABILITIES} & set(self._capabilities))

    @property
    def structured_output_kwargs(self) -> dict[str, Any]:
        """`method="json_schema"` where the server constrains the reply to the schema."""
        if "json_schema" in self._capabilities:
            return {"method": "json_schema"}
        return {"method": "function_calling"}

    @property
    def supports_json_mode(self) -> bool:
        """The platform declares `json_schema` or `json_mode`."""
        return bool({"json_schema", "json_mode"} & set(self._capabilities))

    @property
    def returns_usage_metadata(self) -> bool:
        """The platform declares `streaming` (streams with usage; plain answers always have
        it)."""
        return "streaming" in self._capabilities
