"""LangChain's standard chat-model suite on the platform chosen with `--vllm-platform`.

`PlatformChatModelTests` is `langchain_tests.integration_tests.ChatModelIntegrationTests` with
its model built by the plugin (base URL, model, key, client defaults, metered and cold-start
aware) and its capability flags (`has_tool_calling`, `has_structured_output`,
`supports_json_mode`, `returns_usage_metadata`, ...) read from the platform's `capabilities`.
That is the whole recipe: the class body is empty.
"""

from __future__ import annotations

from pytest_modal_vllm.langchain_standard import PlatformChatModelTests


class TestPlatformChatModel(PlatformChatModelTests):
    """The standard suite through pytest-modal-vllm."""
