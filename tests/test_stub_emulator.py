"""`ModalEmulator` over real HTTP on 127.0.0.1: cold start styles, held requests, 303, proxy
auth, scale to zero and billing, the fault switches, and the control API (`/__modal/`).

No mocks: each test starts an emulator (conftest's `endpoint_server`) on a free loopback port and
talks to it with the `openai` client or `httpx`. Long cold starts are ended by `make_ready()`;
waits are bounded polls, never timed asserts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from modal_emulator import EmulatorBehaviour, ModalEmulator
from stub_helpers import USER, client_for, refused, stub_threads, wait_for

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
    with pytest.raises(ValueError, match="min_containers"):
        EmulatorBehaviour(min_containers=-1)
    with pytest.raises(ValueError, match="max_containers"):
        EmulatorBehaviour(max_containers=0)
    with pytest.raises(ValueError, match=r"min_containers \(2\) exceeds max_containers \(1\)"):
        EmulatorBehaviour(min_containers=2, max_containers=1)


# -- the control API (/__modal/) and failing boots ---------------------------------------------


def control(server: ModalEmulator, method: str, name: str, **kwargs: Any) -> httpx.Response:
    """A request to the emulator's control API, `/__modal/<name>`."""
    return httpx.request(method, f"{server.root_url}/__modal/{name}", timeout=5, **kwargs)


def modal_stats(server: ModalEmulator) -> dict[str, int]:
    response = control(server, "GET", "stats")
    assert response.status_code == 200
    result: dict[str, int] = response.json()
    return result


def ask_in_thread(server: ModalEmulator, outcomes: list[httpx.Response]) -> threading.Thread:
    """A chat request in a thread (with the proxy headers the tests use); its answer lands in
    `outcomes`."""

    def ask() -> None:
        body = {"model": "stub", "messages": USER}
        headers = {"Modal-Key": "wk-1", "Modal-Secret": "ws-1"}
        url = f"{server.base_url}/chat/completions"
        outcomes.append(httpx.post(url, json=body, headers=headers, timeout=30))

    worker = threading.Thread(target=ask)
    worker.start()
    return worker


def test_control_stats_count_runners_backlog_and_inputs(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold", response_delay=60)
    assert modal_stats(server) == {
        "num_total_runners": 1,
        "backlog": 0,
        "num_running_inputs": 0,
        "requires_proxy_auth": False,
    }
    outcomes: list[httpx.Response] = []
    workers = [ask_in_thread(server, outcomes) for _ in range(2)]
    wait_for(lambda: modal_stats(server)["backlog"] == 2)
    assert modal_stats(server)["num_running_inputs"] == 0
    server.make_ready()  # both are answered now, slowly (response_delay)
    wait_for(
        lambda: (
            modal_stats(server)
            == {
                "num_total_runners": 1,
                "backlog": 0,
                "num_running_inputs": 2,
                "requires_proxy_auth": False,
            }
        )
    )
    server.stop()
    for worker in workers:
        worker.join(10)
    assert [r.status_code for r in outcomes] == [503, 503]  # stopped while answering
    stats = server.stats.snapshot()
    assert stats["requests"] == {"/v1/chat/completions": 2}  # the control requests are apart
    assert stats["control_requests"] >= 4


def test_control_is_no_demand_no_activity_and_needs_no_credentials(
    endpoint_server: Emulators,
) -> None:
    server = endpoint_server(
        cold_start=0, scaledown_window=0.5, proxy_auth=("wk-1", "ws-1"), api_key="k"
    )
    server.scale_to_zero()
    assert modal_stats(server)["num_total_runners"] == 0
    assert control(server, "GET", "autoscaler").status_code == 200
    assert server.state == "down"  # not woken
    assert server.stats.cold_starts == 1
    # A web request boots it; control polls every 50 ms do not keep it warm.
    headers = {"Modal-Key": "wk-1", "Modal-Secret": "ws-1", "Authorization": "Bearer k"}
    assert httpx.get(f"{server.base_url}/models", headers=headers).status_code == 200
    assert server.stats.cold_starts == 2
    polls = 0

    def down() -> bool:
        nonlocal polls
        polls += 1
        time.sleep(0.05)
        return modal_stats(server)["num_total_runners"] == 0

    wait_for(down)
    assert polls >= 2
    stats = server.stats.snapshot()
    assert (stats["unauthorized"], stats["requests"]) == (0, {"/v1/models": 1})
    assert stats["control_requests"] == polls + 2
    [idle] = stats["scale_downs"]  # the idle tail after the request
    assert 0.5 <= idle < 5


def test_autoscaler_settings_defaults_overrides_and_errors(endpoint_server: Emulators) -> None:
    server = endpoint_server(scaledown_window=30, buffer_containers=1)
    defaults = {
        "min_containers": 0,
        "max_containers": None,
        "buffer_containers": 1,
        "scaledown_window": 30,
    }
    assert control(server, "GET", "autoscaler").json() == defaults
    update = control(server, "POST", "autoscaler", json={"max_containers": 3})
    assert (update.status_code, update.json()) == (200, {**defaults, "max_containers": 3})
    update = control(
        server, "POST", "autoscaler", json={"buffer_containers": None, "scaledown_window": 2.5}
    )
    expected = {**defaults, "max_containers": 3, "buffer_containers": 0, "scaledown_window": 2.5}
    assert update.json() == expected
    cleared = control(server, "POST", "autoscaler", json={"max_containers": None})
    expected["max_containers"] = None
    assert cleared.json() == expected == server.autoscaler()
    bad_bodies: list[dict[str, Any]] = [
        {"json": {"scaledown_window": 1}},
        {"json": {"scaledown_window": 3601}},
        {"json": {"scaledown_window": "10"}},
        {"json": {"scaledown_window": None}},
        {"json": {"min_containers": "1"}},
        {"json": {"min_containers": -1}},
        {"json": {"min_containers": True}},
        {"json": {"max_containers": 0}},
        {"json": {"min_containers": 4, "max_containers": 3}},
        {"json": {"min_containers": 1, "bogus": 1}},
        {"json": [1]},
        {"content": b"not json"},
    ]
    for body in bad_bodies:
        refused_update = control(server, "POST", "autoscaler", **body)
        assert refused_update.status_code == 400, body
        assert refused_update.json()["error"], body
    assert control(server, "GET", "autoscaler").json() == expected  # nothing half-applied
    errors = [control(server, "POST", "autoscaler", **b).json()["error"] for b in bad_bodies[:2]]
    assert all("2..3600" in error for error in errors)
    assert control(server, "GET", "redeploy").status_code == 405
    assert control(server, "DELETE", "stats").status_code == 405
    assert control(server, "GET", "nowhere").status_code == 404
    assert server.stats.cold_starts == 1
    assert server.stats.snapshot()["requests"] == {}


def test_autoscaler_can_be_unreadable(endpoint_server: Emulators) -> None:
    server = endpoint_server(autoscaler_unreadable=True)
    unreadable = control(server, "GET", "autoscaler")
    assert unreadable.status_code == 503
    assert unreadable.json()["error"]
    assert control(server, "POST", "autoscaler", json={"min_containers": 0}).status_code == 200


def test_min_containers_boots_at_once_and_keeps_the_container(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=0, scaledown_window=0.2)
    server.scale_to_zero()
    assert control(server, "POST", "autoscaler", json={"min_containers": 1}).status_code == 200
    assert server.state == "ready"  # booted at once (cold start 0), without a request
    assert server.stats.cold_starts == 2
    time.sleep(0.6)  # three idle windows: kept
    assert server.state == "ready"
    server.scale_to_zero()  # a container that goes away is replaced at once
    wait_for(lambda: server.state == "ready")
    assert server.stats.cold_starts == 3
    time.sleep(0.3)
    # Back to 0: the container, idle for longer than the window already, goes down now.
    assert control(server, "POST", "autoscaler", json={"min_containers": None}).status_code == 200
    assert server.state == "down"
    [idle] = server.stats.snapshot()["scale_downs"]
    assert idle >= 0.3


def test_new_scaledown_window_applies_to_the_idle_clock_at_once(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=0, scaledown_window=600)
    assert httpx.get(f"{server.base_url}/models").status_code == 200
    time.sleep(2.1)
    assert server.state == "ready"
    answer = control(server, "POST", "autoscaler", json={"scaledown_window": 2})
    assert answer.json()["scaledown_window"] == 2
    assert server.state == "down"  # idle for longer than the new window: down at once
    [idle] = server.stats.snapshot()["scale_downs"]
    assert 2.1 <= idle < 10


def test_redeploy_drains_and_wipes_the_overrides(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=0, scaledown_window=600)
    defaults = control(server, "GET", "autoscaler").json()
    control(server, "POST", "autoscaler", json={"min_containers": 1, "scaledown_window": 100})
    redeploy = control(server, "POST", "redeploy")
    assert (redeploy.status_code, redeploy.json()) == (200, {"deploys": 1})
    assert server.state == "down"  # drained (min_containers was an override, now wiped)
    billed = server.stats.billed_seconds()
    time.sleep(0.1)
    assert server.stats.billed_seconds() == billed
    assert control(server, "GET", "autoscaler").json() == defaults
    assert httpx.get(f"{server.base_url}/models").status_code == 200  # a cold start
    stats = server.stats.snapshot()
    assert (stats["cold_starts"], stats["deploys"], stats["scale_downs"]) == (2, 1, [])


def test_redeploy_with_deployed_min_containers_boots_at_once(endpoint_server: Emulators) -> None:
    server = endpoint_server(cold_start=60, cold_style="hold", min_containers=1)
    server.make_ready()
    assert server.redeploy() == 1
    assert server.state == "booting"  # the new version boots at once
    assert server.stats.cold_starts == 2
    assert modal_stats(server)["num_total_runners"] == 1


def test_startup_exit_fails_every_boot(endpoint_server: Emulators) -> None:
    server = endpoint_server(
        cold_start=60,
        cold_style="hold",
        startup_exit="CUDA out of memory",
        min_containers=1,
        proxy_auth=("wk-1", "ws-1"),
    )
    outcomes: list[httpx.Response] = []
    workers = [ask_in_thread(server, outcomes) for _ in range(2)]
    wait_for(lambda: server.current_stats()["backlog"] == 2)
    server.make_ready()  # the boot ends: the server inside exits
    for worker in workers:
        worker.join(10)
    assert [(r.status_code, r.text) for r in outcomes] == [
        (500, "container exited during startup: CUDA out of memory")
    ] * 2
    assert server.state == "down"
    billed = server.stats.billed_seconds()
    time.sleep(0.2)  # min_containers does not boot again after a failed boot ...
    assert (server.state, server.stats.billed_seconds()) == ("down", billed)

    # ... the next request does (demand), and it fails the same way.
    worker = ask_in_thread(server, outcomes)
    wait_for(lambda: server.current_stats()["backlog"] == 1)
    assert server.state == "booting"
    server.make_ready()
    worker.join(10)
    assert outcomes[-1].status_code == 500
    stats = server.stats.snapshot()
    assert (stats["cold_starts"], stats["failed_boots"], stats["chat_requests"]) == (2, 2, 0)


def test_startup_exit_without_a_cold_start_answers_at_once(endpoint_server: Emulators) -> None:
    server = endpoint_server(startup_exit="exit code 1")
    assert server.state == "down"  # the first boot failed at once
    response = httpx.get(f"{server.root_url}/health")
    assert (response.status_code, response.text) == (
        500,
        "container exited during startup: exit code 1",
    )
    assert server.stats.snapshot()["failed_boots"] == 2
