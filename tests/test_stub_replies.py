"""The stub's deterministic replies over real HTTP on 127.0.0.1: echo, usage, streams, JSON
schemas, forced tools and script rules.

No mocks: each test starts a `StubServer` on a free loopback port and talks to it with the
`openai` client (what users use) or `httpx` (to see raw statuses, headers and bodies).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from stub_helpers import USER, WEATHER_TOOL, client_for, write_script

from pytest_modal_vllm.stub import StubServer


def test_echo_completion_with_usage(serve: Callable[..., StubServer]) -> None:
    server = serve()
    messages: list[Any] = [{"role": "system", "content": "be brief"}, *USER]
    result = client_for(server).chat.completions.create(model="stub", messages=messages)
    assert result.model == "stub"
    choice = result.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", "echo: hello there world")
    assert choice.finish_reason == "stop"
    assert result.usage is not None
    # 2 + 3 words, plus 1 per message; the reply has 4 words.
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 4)
    assert result.usage.total_tokens == 11
    stats = server.stats.snapshot()
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["chat_requests"]) == (7, 4, 1)


def test_content_parts_are_read(serve: Callable[..., StubServer]) -> None:
    server = serve()
    messages: list[Any] = [{"role": "user", "content": [{"type": "text", "text": "from parts"}]}]
    result = client_for(server).chat.completions.create(model="stub", messages=messages)
    assert result.choices[0].message.content == "echo: from parts"


def test_stream_word_by_word_with_usage(serve: Callable[..., StubServer]) -> None:
    server = serve()
    chunks = list(
        client_for(server).chat.completions.create(
            model="stub", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert pieces == ["echo: ", "hello ", "there ", "world"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 4)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_and_raw_sse(serve: Callable[..., StubServer]) -> None:
    server = serve()
    body = {"model": "stub", "messages": USER, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e for e in events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_json_schema_reply_is_generated_from_the_schema(serve: Callable[..., StubServer]) -> None:
    server = serve()
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "mood": {"type": "string", "enum": ["happy", "sad"]},
            "address": {"$ref": "#/$defs/Address"},
            "nickname": {"anyOf": [{"type": "null"}, {"type": "string"}]},
        },
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}}}},
    }
    result = client_for(server).chat.completions.create(
        model="stub",
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    assert json.loads(result.choices[0].message.content or "") == {
        "name": "stub",
        "age": 0,
        "score": 0.0,
        "ok": True,
        "tags": ["stub"],
        "mood": "happy",
        "address": {"city": "stub"},
        "nickname": "stub",
    }
    plain = client_for(server).chat.completions.create(
        model="stub", messages=USER, response_format={"type": "json_object"}
    )
    assert plain.choices[0].message.content == "{}"


def test_max_tokens_truncates(serve: Callable[..., StubServer]) -> None:
    server = serve()
    result = client_for(server).chat.completions.create(model="stub", messages=USER, max_tokens=2)
    assert result.choices[0].message.content == "echo: hello"
    assert result.choices[0].finish_reason == "length"


def test_forced_tool_choice_samples_the_parameters(serve: Callable[..., StubServer]) -> None:
    server = serve()
    result = client_for(server).chat.completions.create(
        model="stub",
        messages=USER,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call: Any = (result.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "stub"}


# -- scripts -----------------------------------------------------------------------------------

SCRIPT = r"""
[[rules]]
match = "weather in (\\w+)"
tool_call = { name = "get_weather", arguments = { city = "{1}", raw = ["{0}"] } }

[[rules]]
role = "tool"
reply = "The tool said: {last}"

[[rules]]
match = "capital of (?P<country>\\w+)"
reply = "I do not know the capital of {country}. {\"literal\": true}"

[[rules]]
match = "^say (.*)$"
reply = "{1}"
"""


def test_script_reply_with_groups(serve: Callable[..., StubServer], tmp_path: Path) -> None:
    server = serve(script=write_script(tmp_path, SCRIPT))
    client = client_for(server)

    def ask(text: str) -> str | None:
        messages: list[Any] = [{"role": "user", "content": text}]
        return (
            client.chat.completions.create(model="stub", messages=messages)
            .choices[0]
            .message.content
        )

    assert ask("SAY Bonjour") == "Bonjour"  # case-insensitive
    assert ask("capital of France?") == 'I do not know the capital of France. {"literal": true}'
    assert ask("nothing matches") == "echo: nothing matches"
    # A tool call rule does not fire when the request offers no tools.
    assert ask("weather in Paris") == "echo: weather in Paris"


def test_script_tool_call_round_trip(serve: Callable[..., StubServer], tmp_path: Path) -> None:
    server = serve(script=write_script(tmp_path, SCRIPT))
    client = client_for(server)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="stub", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = call.function.arguments
    assert json.loads(arguments) == {"city": "Paris", "raw": ["weather in Paris"]}
    assert first.usage is not None
    assert first.usage.completion_tokens == len(arguments.split())

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"})
    second = client.chat.completions.create(model="stub", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "The tool said: 18 C and sunny"
    assert second.choices[0].finish_reason == "stop"


def test_script_tool_call_streamed(serve: Callable[..., StubServer], tmp_path: Path) -> None:
    server = serve(script=write_script(tmp_path, SCRIPT))
    stream = client_for(server).chat.completions.create(
        model="stub",
        messages=[{"role": "user", "content": "weather in Oslo"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    name, arguments, ids, finish = "", "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            if delta.id:
                ids.append(delta.id)
            if delta.function and delta.function.name:
                name += delta.function.name
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
    assert len(ids) == 1
    assert name == "get_weather"
    assert json.loads(arguments) == {"city": "Oslo", "raw": ["weather in Oslo"]}
    assert finish == "tool_calls"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "file not found"),
        ("[[rules]\nreply = 'x'", "invalid TOML"),
        ("[[rules]]\nmatch = 'x'", "rule 1: has neither 'reply' nor 'tool_call'"),
        (
            "[[rules]]\nreply = 'a'\n[[rules]]\nreply = 'b'\ntool_call = { name = 'f' }",
            "rule 2: has both 'reply' and 'tool_call'",
        ),
        ("[[rules]]\nmatch = '(unclosed'\nreply = 'x'", "rule 1: bad regex"),
        ("[[rules]]\nreply = 'x'\nrepyl = 'y'", "rule 1: unknown key 'repyl'"),
        ("[[rules]]\nreply = 'x'\nrole = 'assistant'", "rule 1: 'role' must be one of"),
        ("[[rules]]\nmatch = '(a)'\nreply = '{2}'", "rule 1: {2} refers to a regex group"),
        ("[[rules]]\ntool_call = { name = 'f', args = {} }", "rule 1: unknown key 'args'"),
        ("[[rules]]\ntool_call = { arguments = {} }", "rule 1: tool_call needs a 'name'"),
        ("[rule]\nreply = 'x'", "unknown key 'rule'"),
    ],
)
def test_bad_script_is_a_value_error(tmp_path: Path, text: str | None, problem: str) -> None:
    path = tmp_path / "rules.toml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        StubServer(script=path)
    message = str(info.value)
    assert message.startswith(f"stub script {path}: ")
    assert problem in message
    assert "\n" not in message
