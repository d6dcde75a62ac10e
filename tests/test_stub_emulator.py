"""`ModalEmulator` over real HTTP on 127.0.0.1: cold start styles, held requests, 303, proxy
auth, scale to zero and billing, and the fault switches.

No mocks: each test starts an emulator (conftest's `endpoint_server`) on a free loopback port and
talks to it with the `openai` client or `httpx`. Long cold starts are ended by `make_ready()`;
waits are bounded polls, never timed asserts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from stub_helpers import USER, client_for, refused, stub_threads, wait_for

from pytest_modal_vllm.stub import EmulatorBehaviour, ModalEmulator

Emulators = Callable[..., ModalEmulator]


def test_refuse_until_ready(endpoint_server: Emulators) -> None:
    # Long cold starts ended by make_ready(): the test controls time, so it holds under load.
    server = endpoint_server(cold_start=60, cold_style="refuse")
    assert server.port != 0  # the port is reserved at once
    assert refused(server)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.root_url}/health")
    assert not server.wait_listening(0.05)
    server.make_ready()
    assert server.wait_listening(0)
    assert httpx.get(f"{server.root_url}/health").status_code == 200
    assert server.stats.ready_at is not None


def test_503_until_ready(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="503")
    first = httpx.get(f"{server.root_url}/health")
    assert (first.status_code, first.json()) == (503, {"error": "starting"})
    assert httpx.get(f"{server.base_url}/models").status_code == 503
    assert server.stats.ready_at is None
    server.make_ready()
    assert httpx.get(f"{server.root_url}/health").status_code == 200


def test_hold_answers_after_ready_not_before(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold")
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


def test_hold_ends_with_the_clock(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=0.3, cold_style="hold")
    with httpx.Client(timeout=10) as http:
        response = http.get(f"{server.base_url}/models")
    answered_at = time.monotonic()
    assert response.status_code == 200
    ready_at = server.stats.ready_at
    assert ready_at is not None
    assert answered_at >= ready_at


def test_many_concurrent_held_requests(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold")
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


def test_redirect_after_303_then_get_the_result(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold", redirect_after=0.2)
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


def test_openai_client_follows_the_303(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold", redirect_after=0.2)

    def ready_after_two_redirects() -> None:
        wait_for(lambda: server.stats.redirects >= 2, timeout=10)
        server.make_ready()

    helper = threading.Thread(target=ready_after_two_redirects)
    helper.start()
    answer = client_for(server).chat.completions.create(model="stub", messages=USER)
    helper.join(10)
    assert answer.choices[0].message.content == "echo: hello there world"
    assert server.stats.requests["/__result"] >= 2


def test_proxy_auth(endpoint_server: Emulators) -> None:
    server = endpoint_server(proxy_auth=("wk-1", "ws-1"))
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


def test_scaledown_window_emulates_modal(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=0.3, cold_style="hold", scaledown_window=0.3)
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


def test_scale_to_zero_reboot_answers_503_not_refused(endpoint_server: Emulators) -> None:
    # "refuse" only applies to the very first start: Modal's proxy is always there.
    server = endpoint_server(cold_start=60, cold_style="refuse-then-503")
    server.make_ready()
    server.scale_to_zero()
    assert server.state == "down"
    assert server.stats.ready_at is None
    assert httpx.get(f"{server.root_url}/health").status_code == 503  # and it starts booting
    assert server.state == "booting"
    assert server.stats.cold_starts == 2
    server.make_ready()
    assert httpx.get(f"{server.root_url}/health").status_code == 200


def test_billed_seconds_grow_while_up(endpoint_server: Emulators) -> None:
    server = endpoint_server()
    first = server.stats.billed_seconds()
    time.sleep(0.05)
    assert server.stats.billed_seconds() > first
    snapshot = server.stats.snapshot()
    assert snapshot["cold_starts"] == 1
    assert snapshot["container_seconds"] > 0


def statuses(server: ModalEmulator, count: int) -> list[int]:
    with httpx.Client() as http:
        return [http.get(f"{server.base_url}/models").status_code for _ in range(count)]


def test_fail_rate_is_seeded(endpoint_server: Emulators) -> None:
    first = statuses(endpoint_server(fail_rate=0.3, seed=7), 200)
    again = statuses(endpoint_server(fail_rate=0.3, seed=7), 200)
    assert first == again
    assert set(first) == {200, 503}
    assert 0.2 < first.count(503) / len(first) < 0.4
    other_seed = statuses(endpoint_server(fail_rate=0.3, seed=8), 200)
    assert other_seed != first


def test_fail_mode_reset(endpoint_server: Emulators) -> None:
    server = endpoint_server(fail_rate=1.0, fail_mode="reset")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/models")
    assert httpx.get(f"{server.root_url}/health").status_code == 200  # only /v1/* fails
    assert server.stats.injected_failures == 1


def test_response_delay(endpoint_server: Emulators) -> None:
    server = endpoint_server(response_delay=0.2)
    started = time.monotonic()
    client_for(server).chat.completions.create(model="stub", messages=USER)
    assert time.monotonic() - started >= 0.2


def test_die_refuses_connections(endpoint_server: Emulators) -> None:
    server = endpoint_server()
    assert httpx.get(f"{server.root_url}/health").status_code == 200
    server.die()
    assert server.state == "dead"
    assert refused(server)
    with pytest.raises(openai.APIConnectionError):
        client_for(server).chat.completions.create(model="stub", messages=USER)
    server.stop()
    assert stub_threads() == []


def test_health_hang(endpoint_server: Emulators) -> None:
    server = endpoint_server(health_hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{server.root_url}/health", timeout=0.5)
    assert httpx.get(f"{server.base_url}/models").status_code == 200
    server.stop()
    assert stub_threads() == []


def test_stop_releases_held_requests_and_threads(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold")
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


def test_behaviour_validation() -> None:
    with pytest.raises(ValueError, match="cold_style"):
        EmulatorBehaviour(cold_style="sometimes")
    with pytest.raises(ValueError, match="fail_mode"):
        EmulatorBehaviour(fail_mode="explode")
    with pytest.raises(ValueError, match="fail_rate"):
        EmulatorBehaviour(fail_rate=1.5)
    with pytest.raises(ValueError, match="scaledown_window"):
        EmulatorBehaviour(scaledown_window=0)
