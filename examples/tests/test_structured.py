"""Structured output: replies constrained to a JSON schema by the server.

`@pytest.mark.vllm_requires("json_schema")` runs these where the server enforces
`response_format` `json_schema` (vLLM's guided decoding, llama.cpp's grammars, the stub's
generator). Only the shape is asserted: that what comes back parses and validates. A tiny
model fills the fields with whatever it likes, but it cannot break the schema.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from pytest_modal_vllm import Endpoint

from agent import CityInfo, extract_city

TEXT = (
    "Nairobi grew from a railway depot founded in 1899 into the largest city of Kenya, "
    "and it has been the country's capital since independence in 1963."
)

pytestmark = pytest.mark.vllm_requires("json_schema")


def strict_schema() -> dict[str, Any]:
    schema = CityInfo.model_json_schema()
    schema["additionalProperties"] = False
    return schema


def test_extract_city_validates(chat_model: ChatOpenAI) -> None:
    found = extract_city(chat_model, TEXT)
    assert set(found) == {"city", "country", "is_capital"}
    CityInfo.model_validate(found)


def test_response_format_json_schema(openai_client: openai.OpenAI, vllm_endpoint: Endpoint) -> None:
    reply = openai_client.chat.completions.create(
        model=vllm_endpoint.model,
        messages=[
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": f"Which city is this text about?\n\n{TEXT}"},
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city_info", "schema": strict_schema(), "strict": True},
        },
        max_tokens=256,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", "the JSON document was cut off"
    assert choice.message.content
    document = json.loads(choice.message.content)
    CityInfo.model_validate(document)
