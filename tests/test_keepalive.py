"""Keep-alive units: the ping thread against a real stub, the autoscaler pin, session close."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PROXY_KEY, PROXY_SECRET
from fake_modal import read_calls

from pytest_modal_vllm.keepalive import AutoscalerKeepAlive, PingKeepAlive
from pytest_modal_vllm.platforms import Platform
from pytest_modal_vllm.resolution import resolve_platforms
from pytest_modal_vllm.session import EndpointSession
from pytest_modal_vllm.settings import resolve
from pytest_modal_vllm.stub import StubServer


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` until true or `timeout` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(0.01)
    return True


def keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vllm-keepalive-")]


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    """Every test here must end with no keep-alive thread of its own still running."""
    before = set(keepalive_threads())
    yield
    assert wait_until(lambda: set(keepalive_threads()) <= before, 5.0), keepalive_threads()


# ----------------------------------------------------------------------------- ping


def test_pings_are_counted_against_the_server(
    endpoint_server: Callable[..., StubServer],
) -> None:
    server = endpoint_server()
    keepalive = PingKeepAlive("p", server.root_url, 0.05).start()
    assert keepalive.root_url == server.root_url
    assert wait_until(lambda: keepalive.pings >= 3)
    keepalive.stop()
    # After stop() returned, the thread is gone: every ping it sent is counted on both sides.
    assert not keepalive._thread.is_alive()
    assert keepalive.failures == 0
    assert server.stats.health_requests == keepalive.pings
    assert server.stats.requests == {"/health": keepalive.pings}
    frozen = keepalive.pings
    time.sleep(0.2)  # four intervals: nothing more is sent once stopped
    assert keepalive.pings == frozen == server.stats.health_requests


def test_thread_is_a_named_daemon(endpoint_server: Callable[..., StubServer]) -> None:
    server = endpoint_server()
    keepalive = PingKeepAlive("my-platform", server.root_url, 30.0).start()
    try:
        thread = keepalive._thread
        assert thread in keepalive_threads()
        assert thread.name == "vllm-keepalive-my-platform"
        assert thread.daemon
    finally:
        keepalive.stop()


def test_stop_does_not_wait_out_a_long_interval(
    endpoint_server: Callable[..., StubServer],
) -> None:
    server = endpoint_server()
    keepalive = PingKeepAlive("p", server.root_url, 30.0).start()
    started = time.monotonic()
    keepalive.stop()
    assert time.monotonic() - started < 5.0  # far below the 30 s interval
    assert not keepalive._thread.is_alive()
    assert keepalive.pings == 0
    assert server.stats.health_requests == 0
    keepalive.stop()  # twice is safe


def test_stop_is_bounded_while_a_ping_is_held(
    endpoint_server: Callable[..., StubServer],
) -> None:
    # /health accepts and never answers: the ping in flight times out, stop() still returns.
    server = endpoint_server(health_hang=True)
    keepalive = PingKeepAlive("p", server.root_url, 0.05).start()
    assert wait_until(lambda: server.stats.health_requests >= 1)
    started = time.monotonic()
    keepalive.stop()
    assert time.monotonic() - started < 5.0
    assert not keepalive._thread.is_alive()
    assert keepalive.pings == 0


def test_pings_send_the_proxy_headers(endpoint_server: Callable[..., StubServer]) -> None:
    server = endpoint_server(proxy_auth=(PROXY_KEY, PROXY_SECRET))
    headers = {"Modal-Key": PROXY_KEY, "Modal-Secret": PROXY_SECRET}
    keepalive = PingKeepAlive("p", server.root_url, 0.05, headers).start()
    assert wait_until(lambda: keepalive.pings >= 2)
    keepalive.stop()
    assert server.stats.unauthorized == 0
    assert keepalive.failures == 0


def test_failed_pings_are_counted_and_the_thread_goes_on() -> None:
    server = StubServer().start()
    root = server.root_url
    server.stop()  # the port now refuses connections
    keepalive = PingKeepAlive("p", root, 0.05).start()
    try:
        assert wait_until(lambda: keepalive.failures >= 2)
        assert keepalive._thread.is_alive()
        assert keepalive.pings == 0
    finally:
        keepalive.stop()


# ----------------------------------------------------------------------------- autoscaler


class FakePinnable:
    """Records pin/unpin; can be told to fail either."""

    def __init__(self, log: list[str] | None = None, name: str = "", *, fail_pin: bool = False):
        self.log = [] if log is None else log
        self.name = name
        self.fail_pin = fail_pin
        self.fail_unpin = False

    def pin(self) -> None:
        self.log.append(f"pin{self.name}")
        if self.fail_pin:
            raise RuntimeError("pin failed")

    def unpin(self) -> None:
        self.log.append(f"unpin{self.name}")
        if self.fail_unpin:
            raise RuntimeError("unpin failed")


def test_autoscaler_pins_at_start_and_unpins_once_at_stop() -> None:
    provider = FakePinnable()
    keepalive = AutoscalerKeepAlive(provider)
    assert provider.log == []  # constructing does nothing
    assert keepalive.start() is keepalive
    assert provider.log == ["pin"]
    assert keepalive.pings == 0
    keepalive.stop()
    keepalive.stop()
    assert provider.log == ["pin", "unpin"]


def test_autoscaler_stop_without_start_unpins_nothing() -> None:
    provider = FakePinnable()
    AutoscalerKeepAlive(provider).stop()
    assert provider.log == []


def test_autoscaler_unpins_even_when_pin_raised() -> None:
    provider = FakePinnable(fail_pin=True)
    keepalive = AutoscalerKeepAlive(provider)
    with pytest.raises(RuntimeError, match="pin failed"):
        keepalive.start()
    keepalive.stop()
    keepalive.stop()
    assert provider.log == ["pin", "unpin"]


def test_autoscaler_failed_unpin_is_raised_once() -> None:
    provider = FakePinnable()
    keepalive = AutoscalerKeepAlive(provider).start()
    provider.fail_unpin = True
    with pytest.raises(RuntimeError, match="unpin failed"):
        keepalive.stop()
    keepalive.stop()  # not retried
    assert provider.log == ["pin", "unpin"]


# ----------------------------------------------------------------------------- session close


class FailingProvider:
    """A provider whose stop() raises (a plain error, or Ctrl-C)."""

    def __init__(self, log: list[str], name: str, error: BaseException) -> None:
        self.log, self.name, self.error = log, name, error

    def stop(self) -> None:
        self.log.append(f"stop{self.name}")
        raise self.error


def modal_platform(name: str, **fields: object) -> Platform:
    values: dict[str, object] = {"name": name, "kind": "modal", "app": "my-app"}
    values.update(fields)
    return Platform(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=repr)
def test_close_restores_the_autoscaler_when_a_provider_stop_raises(error: BaseException) -> None:
    settings = resolve({"keep_alive": "autoscaler"}, {}, {})
    platforms = resolve_platforms([modal_platform("a"), modal_platform("b")], settings)
    session = EndpointSession(platforms)
    log: list[str] = []
    for run in session.runs:
        assert run.platform.keep_alive.value == "autoscaler"
        run.keepalive = AutoscalerKeepAlive(FakePinnable(log, run.name)).start()
        run.provider = FailingProvider(log, run.name, error)  # type: ignore[assignment]
    log.clear()

    problems = session.close()

    # Reverse order; per platform the pin is undone before the provider stops; one raising
    # stop() does not keep the other platform's autoscaler from being restored.
    assert log == ["unpinb", "stopb", "unpina", "stopa"]
    assert len(problems) == 2
    assert all("stopping its provider failed" in problem for problem in problems)
    assert problems[0].startswith("b: ")
    assert session.close() == []  # idempotent: nothing is undone twice
    assert log == ["unpinb", "stopb", "unpina", "stopa"]


def test_close_restores_the_autoscaler_when_its_own_unpin_raises() -> None:
    settings = resolve({"keep_alive": "autoscaler"}, {}, {})
    session = EndpointSession(resolve_platforms([modal_platform("a")], settings))
    log: list[str] = []
    (run,) = session.runs
    pinnable = FakePinnable(log)
    run.keepalive = AutoscalerKeepAlive(pinnable).start()
    pinnable.fail_unpin = True
    run.provider = FailingProvider(log, "", RuntimeError("stop failed"))  # type: ignore[assignment]
    problems = session.close()
    assert log == ["pin", "unpin", "stop"]  # the provider is still stopped
    assert [p.split(": ")[1] for p in problems] == [
        "stopping its keep-alive failed",
        "stopping its provider failed",
    ]


def test_session_pins_through_the_modal_provider_and_close_restores_after_a_failing_stop(
    endpoint_server: Callable[..., StubServer],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The real chain: EndpointSession -> ModalProvider -> the fake adapter -> the emulator."""
    server = endpoint_server()
    state = tmp_path / "state.json"
    monkeypatch.setenv("MODAL_VLLM_SDK_ADAPTER", "fake_modal:FakeModal")
    monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps({"my-app/serve": server.root_url}))
    monkeypatch.setenv("FAKE_MODAL_STATE", str(state))
    monkeypatch.setenv("FAKE_MODAL_CALLS", str(tmp_path / "calls.jsonl"))
    for name in ("FAKE_MODAL_DEPLOYED", "FAKE_MODAL_FAIL", "FAKE_MODAL_NO_AUTH", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)

    settings = resolve({"keep_alive": "autoscaler"}, {}, {})
    session = EndpointSession(resolve_platforms([modal_platform("m")], settings))
    try:
        session.start(fail_fast=True)
        assert server.autoscaler()["min_containers"] == 1
        assert session.keep_alive_pings() == {"m": 0}
        (run,) = session.runs

        def broken_stop() -> None:
            raise RuntimeError("provider stop failed")

        monkeypatch.setattr(run.provider, "stop", broken_stop)
    finally:
        problems = session.close()
    assert server.autoscaler()["min_containers"] == 0
    assert problems[0] == "m: stopping its provider failed: provider stop failed"
    assert "m: restored min_containers to 0" in problems  # what the shared lease did
    updates = [
        c["min_containers"]
        for c in read_calls(tmp_path / "calls.jsonl")
        if c["call"] == "update_autoscaler"
    ]
    assert updates == [1, 0]
