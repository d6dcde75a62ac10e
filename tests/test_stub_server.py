"""The stub server over real HTTP on 127.0.0.1: replies, scripts, and every readiness switch.

No mocks: each test starts a `StubServer` on a free loopback port and talks to it with the
`openai` client (what users use) or `httpx` (to see raw statuses, headers and bodies). Waits are
bounded polls, never timed asserts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pytest_modal_vllm import stub_server
from pytest_modal_vllm.stub_server import Behaviour, StubServer

REPO_ROOT = Path(stub_server.__file__).resolve().parents[1]
USER: list[Any] = [{"role": "user", "content": "hello there world"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[..., StubServer]]:
    """Start stub servers for a test and always stop them, even when the test fails."""
    started: list[StubServer] = []

    def start(**kwargs: Any) -> StubServer:
        server = StubServer(**kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


_open_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close the openai clients a test made, so no client socket outlives the test."""
    yield
    while _open_clients:
        _open_clients.pop().close()


def client_for(server: StubServer, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("api_key", "unused")
    kwargs.setdefault("max_retries", 0)
    kwargs.setdefault("timeout", 10)
    client = openai.OpenAI(base_url=server.base_url, **kwargs)
    _open_clients.append(client)
    return client


def refused(server: StubServer) -> bool:
    """True when a TCP connect to the server's port is refused."""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)


def stub_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("stub-server")]


def write_script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    return path


# -- endpoints and replies ---------------------------------------------------------------------


def test_health_and_models(serve: Callable[..., StubServer]) -> None:
    server = serve(model="my-model")
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    assert server.root_url == f"http://127.0.0.1:{server.port}"
    health = httpx.get(f"{server.root_url}/health")
    assert (health.status_code, health.content) == (200, b"")
    models = httpx.get(f"{server.base_url}/models").json()
    assert models == {
        "object": "list",
        "data": [
            {
                "id": "my-model",
                "object": "model",
                "created": stub_server.CREATED,
                "owned_by": "stub",
            }
        ],
    }
    assert [m.id for m in client_for(server).models.list()] == ["my-model"]


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


def test_keep_alive_reuses_one_connection(serve: Callable[..., StubServer]) -> None:
    server = serve()
    body = {"model": "stub", "messages": USER}
    with httpx.Client() as http:
        for _ in range(3):
            assert http.get(f"{server.root_url}/health").status_code == 200
            assert http.post(f"{server.base_url}/chat/completions", json=body).status_code == 200
        with http.stream(
            "POST", f"{server.base_url}/chat/completions", json={**body, "stream": True}
        ) as streamed:
            streamed.read()
        assert http.get(f"{server.base_url}/models").status_code == 200
    assert server.stats.connections == 1


def test_unknown_model_and_path(serve: Callable[..., StubServer]) -> None:
    server = serve(model="served")
    with pytest.raises(openai.NotFoundError) as info:
        client_for(server).chat.completions.create(model="other", messages=USER)
    assert "The model `other` does not exist." in str(info.value)
    raw = httpx.post(f"{server.base_url}/chat/completions", json={"model": "x", "messages": USER})
    assert raw.status_code == 404
    assert raw.json()["error"]["type"] == "NotFoundError"
    nowhere = httpx.get(f"{server.root_url}/nowhere")
    assert nowhere.status_code == 404
    assert nowhere.json() == {"detail": "Not Found"}
    bad = httpx.post(f"{server.base_url}/chat/completions", content=b"not json")
    assert bad.status_code == 400


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


# -- readiness switches ------------------------------------------------------------------------


def test_refuse_until_ready(serve: Callable[..., StubServer]) -> None:
    # Long cold starts ended by make_ready(): the test controls time, so it holds under load.
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="refuse"))
    assert server.port != 0  # the port is reserved at once
    assert refused(server)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.root_url}/health")
    assert not server.wait_listening(0.05)
    server.make_ready()
    assert server.wait_listening(0)
    assert httpx.get(f"{server.root_url}/health").status_code == 200
    assert server.stats.ready_at is not None


def test_503_until_ready(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="503"))
    first = httpx.get(f"{server.root_url}/health")
    assert (first.status_code, first.json()) == (503, {"error": "starting"})
    assert httpx.get(f"{server.base_url}/models").status_code == 503
    assert server.stats.ready_at is None
    server.make_ready()
    assert httpx.get(f"{server.root_url}/health").status_code == 200


def test_refuse_then_503_then_ready_in_that_order(serve: Callable[..., StubServer]) -> None:
    # The one test driven by the clock alone: 1 s refusing, then 1 s answering 503. The client
    # is built first: on a loaded machine that alone can take longer than a phase.
    seen: list[str] = []
    with httpx.Client(timeout=2) as http:
        server = serve(behaviour=Behaviour(cold_start=2.0))  # the default style
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] != "200") and time.monotonic() < deadline:
            try:
                outcome = str(http.get(f"{server.root_url}/health").status_code)
            except httpx.ConnectError:
                outcome = "refused"
            if not seen or seen[-1] != outcome:
                seen.append(outcome)
            time.sleep(0.02)
    assert seen == ["refused", "503", "200"]
    assert server.stats.cold_starts == 1


def test_hold_answers_after_ready_not_before(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="hold"))
    answered_at: list[float] = []

    def ask() -> None:
        client_for(server).chat.completions.create(model="stub", messages=USER)
        answered_at.append(time.monotonic())

    worker = threading.Thread(target=ask)
    worker.start()
    wait_for(lambda: server.stats.chat_requests == 0 and bool(server.stats.requests))
    assert not answered_at  # held, not refused and not answered
    server.make_ready()
    worker.join(10)
    assert answered_at
    ready_at = server.stats.ready_at
    assert ready_at is not None
    assert answered_at[0] >= ready_at


def test_hold_ends_with_the_clock(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=0.3, cold_style="hold"))
    with httpx.Client(timeout=10) as http:
        response = http.get(f"{server.base_url}/models")
    answered_at = time.monotonic()
    assert response.status_code == 200
    ready_at = server.stats.ready_at
    assert ready_at is not None
    assert answered_at >= ready_at


def test_many_concurrent_held_requests(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="hold"))
    body = {"model": "stub", "messages": USER}
    url = f"{server.base_url}/chat/completions"
    # One client with room for every request at once: each waits on its own connection.
    with (
        httpx.Client(timeout=10, limits=httpx.Limits(max_connections=40)) as http,
        ThreadPoolExecutor(max_workers=40) as pool,
    ):
        futures = [pool.submit(http.post, url, json=body) for _ in range(40)]
        wait_for(lambda: server.stats.requests.get("/v1/chat/completions", 0) == 40)
        server.make_ready()
        statuses = [future.result().status_code for future in futures]
    assert statuses == [200] * 40
    assert server.stats.connections == 40


def test_redirect_after_303_then_get_the_result(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="hold", redirect_after=0.2))
    body = {"model": "stub", "messages": USER}
    first = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=5)
    assert first.status_code == 303
    location = first.headers["location"]
    assert location.startswith("/__result/")
    # The location is fetched with GET (what clients do on 303), held again, redirected again.
    again = httpx.get(f"{server.root_url}{location}", timeout=5)
    assert (again.status_code, again.headers["location"]) == (303, location)
    assert server.stats.redirects == 2
    server.make_ready()
    # ... and finally answered with the original POST's result.
    result = httpx.get(f"{server.root_url}{location}", timeout=5)
    assert result.status_code == 200
    assert result.json()["choices"][0]["message"]["content"] == "echo: hello there world"
    assert httpx.get(f"{server.root_url}{location}").status_code == 404  # answered once


def test_openai_client_follows_the_303(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="hold", redirect_after=0.2))

    def ready_after_two_redirects() -> None:
        wait_for(lambda: server.stats.redirects >= 2, timeout=10)
        server.make_ready()

    helper = threading.Thread(target=ready_after_two_redirects)
    helper.start()
    answer = client_for(server).chat.completions.create(model="stub", messages=USER)
    helper.join(10)
    assert answer.choices[0].message.content == "echo: hello there world"
    assert server.stats.requests["/__result"] >= 2


def test_api_key(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(api_key="sekret"))
    no_key = httpx.get(f"{server.base_url}/models")
    assert (no_key.status_code, no_key.json()) == (401, {"error": "Unauthorized"})
    wrong = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    good = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer sekret"})
    assert good.status_code == 200
    assert httpx.get(f"{server.root_url}/health").status_code == 200  # like vLLM
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="nope").chat.completions.create(model="stub", messages=USER)
    result = client_for(server, api_key="sekret").chat.completions.create(
        model="stub", messages=USER
    )
    assert result.choices[0].message.content == "echo: hello there world"
    assert server.stats.unauthorized == 3
    assert "sekret" not in repr(server.behaviour)


def test_proxy_auth(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(proxy_auth=("wk-1", "ws-1")))
    missing = httpx.get(f"{server.root_url}/health")
    assert missing.status_code == 401
    assert missing.text == "modal-http: missing credentials for proxy authorization"
    wrong = httpx.get(
        f"{server.root_url}/health", headers={"Modal-Key": "wk-1", "Modal-Secret": "bad"}
    )
    assert wrong.status_code == 401
    good_headers = {"Modal-Key": "wk-1", "Modal-Secret": "ws-1"}
    assert httpx.get(f"{server.root_url}/health", headers=good_headers).status_code == 200
    client = client_for(server, default_headers=good_headers)
    assert client.chat.completions.create(model="stub", messages=USER).choices
    assert "ws-1" not in repr(server.behaviour)


def test_scaledown_window_emulates_modal(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=0.3, cold_style="hold", scaledown_window=0.3))
    client = client_for(server)
    client.chat.completions.create(model="stub", messages=USER)  # held through the cold start
    # 1, or 2 on a machine so loaded that the first container idled out before the request.
    boots = server.stats.cold_starts
    wait_for(lambda: server.state == "down")
    assert server.stats.ready_at is None
    billed = server.stats.billed_seconds()
    assert billed > 0
    time.sleep(0.2)
    assert server.stats.billed_seconds() == billed  # a stopped container costs nothing

    # The next request wakes a new container and is held through its cold start: a 200, not a
    # 503 (the new container may already have scaled down again when the test looks).
    answered = client.chat.completions.create(model="stub", messages=USER)
    assert answered.choices[0].message.content == "echo: hello there world"
    assert server.stats.cold_starts == boots + 1
    assert server.stats.container_seconds > billed


def test_scale_to_zero_reboot_answers_503_not_refused(serve: Callable[..., StubServer]) -> None:
    # "refuse" only applies to the very first start: Modal's proxy is always there.
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="refuse-then-503"))
    server.make_ready()
    server.scale_to_zero()
    assert server.state == "down"
    assert server.stats.ready_at is None
    assert httpx.get(f"{server.root_url}/health").status_code == 503  # and it starts booting
    assert server.state == "booting"
    assert server.stats.cold_starts == 2
    server.make_ready()
    assert httpx.get(f"{server.root_url}/health").status_code == 200


def test_billed_seconds_grow_while_up(serve: Callable[..., StubServer]) -> None:
    server = serve()
    first = server.stats.billed_seconds()
    time.sleep(0.05)
    assert server.stats.billed_seconds() > first
    snapshot = server.stats.snapshot()
    assert snapshot["cold_starts"] == 1
    assert snapshot["container_seconds"] > 0


def statuses(server: StubServer, count: int) -> list[int]:
    with httpx.Client() as http:
        return [http.get(f"{server.base_url}/models").status_code for _ in range(count)]


def test_fail_rate_is_seeded(serve: Callable[..., StubServer]) -> None:
    behaviour = Behaviour(fail_rate=0.3, seed=7)
    first = statuses(serve(behaviour=behaviour), 200)
    again = statuses(serve(behaviour=Behaviour(fail_rate=0.3, seed=7)), 200)
    assert first == again
    assert set(first) == {200, 503}
    assert 0.2 < first.count(503) / len(first) < 0.4
    other_seed = statuses(serve(behaviour=Behaviour(fail_rate=0.3, seed=8)), 200)
    assert other_seed != first


def test_fail_mode_reset(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(fail_rate=1.0, fail_mode="reset"))
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/models")
    assert httpx.get(f"{server.root_url}/health").status_code == 200  # only /v1/* fails
    assert server.stats.injected_failures == 1


def test_response_delay(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(response_delay=0.2))
    started = time.monotonic()
    client_for(server).chat.completions.create(model="stub", messages=USER)
    assert time.monotonic() - started >= 0.2


def test_die_refuses_connections(serve: Callable[..., StubServer]) -> None:
    server = serve()
    assert httpx.get(f"{server.root_url}/health").status_code == 200
    server.die()
    assert server.state == "dead"
    assert refused(server)
    with pytest.raises(openai.APIConnectionError):
        client_for(server).chat.completions.create(model="stub", messages=USER)
    server.stop()
    assert stub_threads() == []


def test_health_hang(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(health_hang=True))
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{server.root_url}/health", timeout=0.5)
    assert httpx.get(f"{server.base_url}/models").status_code == 200
    server.stop()
    assert stub_threads() == []


def test_stop_releases_held_requests_and_threads(serve: Callable[..., StubServer]) -> None:
    server = serve(behaviour=Behaviour(cold_start=60, cold_style="hold"))
    outcomes: list[str] = []

    def ask() -> None:
        try:
            response = httpx.get(f"{server.base_url}/models", timeout=30)
            outcomes.append(str(response.status_code))
        except httpx.TransportError as exc:
            outcomes.append(type(exc).__name__)

    workers = [threading.Thread(target=ask) for _ in range(5)]
    for worker in workers:
        worker.start()
    wait_for(lambda: server.stats.snapshot()["requests"].get("/v1/models", 0) == 5)
    server.stop()
    server.stop()  # idempotent
    for worker in workers:
        worker.join(5)
        assert not worker.is_alive()
    assert len(outcomes) == 5
    assert all(o == "503" or o.endswith(("Error", "Disconnected")) for o in outcomes), outcomes
    assert stub_threads() == []
    assert refused(server)


def test_context_manager_and_thread_cleanup() -> None:
    with httpx.Client() as http:
        with StubServer() as server:
            assert http.get(f"{server.root_url}/health").status_code == 200
            assert stub_threads()
        # The client's keep-alive connection is still open: stop() must not wait on it.
        assert stub_threads() == []
    assert server.state == "stopped"


def test_behaviour_validation() -> None:
    with pytest.raises(ValueError, match="cold_style"):
        Behaviour(cold_style="sometimes")
    with pytest.raises(ValueError, match="fail_mode"):
        Behaviour(fail_mode="explode")
    with pytest.raises(ValueError, match="fail_rate"):
        Behaviour(fail_rate=1.5)
    with pytest.raises(ValueError, match="scaledown_window"):
        Behaviour(scaledown_window=0)


def test_module_import_is_cheap() -> None:
    # Load the file on its own (not through the package) and check that the HTTP machinery
    # is not imported until a server starts.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {stub_server.__file__!r})\n"
        "module = sys.modules['s'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('http.server', 'socketserver', 'tomllib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- python -m pytest_modal_vllm.stub_server ---------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_python_m_entry_point(tmp_path: Path, signum: int) -> None:
    script = write_script(tmp_path, "[[rules]]\nreply = 'scripted'\n")
    command = [
        sys.executable,
        "-m",
        "pytest_modal_vllm.stub_server",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--model",
        "child",
        "--script",
        str(script),
        "--cold-start",
        "0.3",
        "--cold-style",
        "hold",
        "--api-key",
        "k",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    ) as proc:
        watchdog = threading.Timer(20, proc.kill)  # a hung child must not hang the suite
        watchdog.start()
        try:
            assert proc.stdout is not None
            assert proc.stderr is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("stub server ready at http://127.0.0.1:")
            assert line.endswith("/v1")
            base_url = line.removeprefix("stub server ready at ")
            with openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=10) as client:
                result = client.chat.completions.create(model="child", messages=USER)
            assert result.choices[0].message.content == "scripted"
            proc.send_signal(signum)
            assert proc.wait(10) == 0
            assert proc.stdout.read() == ""
            assert proc.stderr.read() == ""
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()


def test_python_m_bad_script_fails_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    command = [sys.executable, "-m", "pytest_modal_vllm.stub_server", "--script", str(missing)]
    out = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=20)
    assert out.returncode == 2
    assert f"stub script {missing}: file not found" in out.stderr
    assert out.stdout == ""
