"""Plain chat, streaming and summaries: these run on every platform, even a 135M model.

The assertions are structural (non-empty text, chunks arrive, token usage is reported and
bounded), never the wording: a real model's phrasing changes with the model, its version and
the serving stack.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import reduce

import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pytest_modal_vllm import Endpoint

from agent import summarize, visible_text

TEXT = (
    "The Rhine is one of Europe's major rivers. It rises in the Swiss Alps, forms part of the "
    "borders of Switzerland, Liechtenstein, Austria, Germany and France, and flows north "
    "through Germany and the Netherlands into the North Sea. For centuries it has been a "
    "busy trade route, and castles and vineyards line its middle valley."
)


def test_plain_chat_answers(chat_model: ChatOpenAI) -> None:
    reply = chat_model.invoke("Say hello in one short sentence.")
    assert isinstance(reply.content, str)
    assert reply.content.strip()
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] > 0


def test_endpoint_serves_the_model(openai_client: openai.OpenAI, vllm_endpoint: Endpoint) -> None:
    served = [model.id for model in openai_client.models.list()]
    assert vllm_endpoint.model in served


@pytest.mark.vllm_requires("streaming")
def test_openai_streaming_reports_usage(
    openai_client: openai.OpenAI, vllm_endpoint: Endpoint
) -> None:
    stream = openai_client.chat.completions.create(
        model=vllm_endpoint.model,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=64,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert pieces, "no content chunk arrived"
    assert "".join(pieces).strip()
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish
    assert finish[-1] in ("stop", "length")
    # With include_usage, the last chunk has no choices and carries the usage of the request.
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 64


@pytest.mark.vllm_requires("streaming")
def test_langchain_streaming_has_usage_metadata(chat_model: ChatOpenAI) -> None:
    chunks = list(chat_model.stream("Name three colours."))
    assert len(chunks) > 1
    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    merged = reduce(lambda a, b: a + b, chunks)
    assert visible_text(merged) or merged.content  # Qwen3 may spend short replies thinking
    assert merged.usage_metadata is not None
    assert merged.usage_metadata["input_tokens"] > 0
    assert merged.usage_metadata["output_tokens"] > 0


def test_max_tokens_bounds_the_reply(chat_model_factory: Callable[..., ChatOpenAI]) -> None:
    short = chat_model_factory(max_tokens=5)
    reply = short.invoke("Write a long story about a dragon who learns to fly.")
    assert reply.usage_metadata is not None
    assert 0 < reply.usage_metadata["output_tokens"] <= 5
    assert reply.response_metadata["finish_reason"] in ("length", "stop")


def test_summarize_returns_text(chat_model: ChatOpenAI) -> None:
    summary = summarize(chat_model, TEXT)
    assert isinstance(summary, str)
    assert summary.strip()
