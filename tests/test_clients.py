"""The clients' transport, in process, over real HTTP to the emulator: metering of plain,
streamed and failed answers, the body cap, redirect hops, and one re-wake per platform."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from modal_emulator import ModalEmulator

from pytest_modal_vllm.clients import BODY_CAP, TAIL_KEEP, ClientFactory, _Recorder
from pytest_modal_vllm.endpoint import Endpoint
from pytest_modal_vllm.errors import UnavailableError
from pytest_modal_vllm.resolution import ClientOptions
from pytest_modal_vllm.usage import UsageMeter
from pytest_modal_vllm.wake import WakeRequest

ASK = [{"role": "user", "content": "one two three"}]


def factory_for(
    server: ModalEmulator, meter: UsageMeter, rewake: Callable[[], object] | None = None
) -> ClientFactory:
    endpoint = Endpoint(platform="p", base_url=server.base_url, model=server.model)
    wake = WakeRequest(platform="p", base_url=server.base_url, timeout=10.0)
    return ClientFactory(endpoint, ClientOptions(max_retries=0), meter, rewake or wake.rewake)


def counts(meter: UsageMeter) -> dict[str, Any]:
    usage = meter.snapshot()["p"]
    return {k: usage[k] for k in ("requests", "errors", "prompt_tokens", "completion_tokens")}


def test_a_plain_answer_is_metered_once_with_its_tokens(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    server = endpoint_server()
    meter = UsageMeter()
    client = factory_for(server, meter).openai_client()
    answer = client.chat.completions.create(model="stub", messages=ASK)
    assert answer.usage is not None
    assert counts(meter) == {
        "requests": 1,
        "errors": 0,
        "prompt_tokens": answer.usage.prompt_tokens,
        "completion_tokens": answer.usage.completion_tokens,
    }
    assert server.stats.prompt_tokens == answer.usage.prompt_tokens


def test_a_streamed_answer_is_metered_when_consumed_with_its_usage_chunk(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    server = endpoint_server()
    meter = UsageMeter()
    client = factory_for(server, meter).openai_client()
    stream = client.chat.completions.create(
        model="stub", messages=ASK, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None
    assert counts(meter) == {
        "requests": 1,
        "errors": 0,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def test_a_failed_answer_counts_as_an_error_without_tokens(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    import openai

    server = endpoint_server(api_key="sk-right")
    meter = UsageMeter()
    client = factory_for(server, meter).openai_client()  # sends no key: 401
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="stub", messages=ASK)
    assert counts(meter) == {"requests": 1, "errors": 1, "prompt_tokens": 0, "completion_tokens": 0}


def test_a_followed_redirect_is_one_request(endpoint_server: Callable[..., ModalEmulator]) -> None:
    server = endpoint_server(cold_start=1.2, cold_style="hold", redirect_after=0.3)
    meter = UsageMeter()
    client = factory_for(server, meter).openai_client()
    client.models.list()  # held, answered 303 (several times), then followed to the result
    assert server.stats.redirects >= 1
    assert counts(meter)["requests"] == 1
    assert meter.snapshot()["p"]["latencies_ms"][0] >= 1000  # from the first hop's start


def test_the_body_cap_keeps_the_tail_where_the_usage_is() -> None:
    meter = UsageMeter()
    recorder = _Recorder(meter, "p", 0.0, False, False)
    filler = b"data: " + b"x" * 65536 + b"\n\n"
    for _ in range(BODY_CAP // len(filler) + 2):
        recorder.add(filler)
    assert recorder.size <= TAIL_KEEP + len(filler)  # bounded, whatever the body's length
    recorder.add(b'data: {"usage": {"prompt_tokens": 7, "completion_tokens": 9}}\n\n')
    recorder.finish()
    recorder.finish()  # counted once
    usage = meter.snapshot()["p"]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 7, 9)


def test_concurrent_requests_to_a_cold_endpoint_share_one_rewake(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    server = endpoint_server(cold_start=0.6, cold_style="503")
    assert server.wait_ready(5)
    server.scale_to_zero()  # the next request boots a container and gets 503 meanwhile
    wake = WakeRequest(platform="p", base_url=server.base_url, timeout=10.0)
    rewakes: list[float] = []

    def counted_rewake() -> object:
        rewakes.append(1.0)
        return wake.rewake()

    meter = UsageMeter()
    factory = factory_for(server, meter, counted_rewake)
    client = factory.openai_client()
    answers: list[str | None] = []
    barrier = threading.Barrier(5)

    def ask() -> None:
        barrier.wait()
        reply = client.chat.completions.create(model="stub", messages=ASK)
        answers.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == ["echo: one two three"] * 5
    assert len(rewakes) == 1
    assert factory.guard.rewakes == 1
    assert counts(meter)["requests"] == 5
    assert counts(meter)["errors"] == 0


def test_a_failed_rewake_makes_later_requests_fail_at_once(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    import openai

    server = endpoint_server()
    calls: list[int] = []

    def dead() -> object:
        calls.append(1)
        raise UnavailableError("it stayed down", "", platform="p")

    factory = factory_for(server, UsageMeter(), dead)
    client = factory.openai_client()
    server.die()
    for _ in range(3):
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="stub", messages=ASK)
    assert calls == [1]  # one re-wake; then the platform is known dead
    assert factory.guard.dead is not None and "it stayed down" in factory.guard.dead


def test_async_clients_share_the_same_transport_logic(
    endpoint_server: Callable[..., ModalEmulator],
) -> None:
    import asyncio

    server = endpoint_server()
    meter = UsageMeter()
    factory = factory_for(server, meter)

    async def ask() -> str | None:
        client = factory.async_openai_client()
        answer = await client.chat.completions.create(model="stub", messages=ASK)
        await client.close()
        return answer.choices[0].message.content

    assert asyncio.run(ask()) == "echo: one two three"
    assert counts(meter)["requests"] == 1
    assert counts(meter)["prompt_tokens"] > 0
