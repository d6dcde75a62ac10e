"""Leases, in process, with a clock the test moves: the shared pin, the original settings, the
idle tail, expired sessions, the single pinger; the store is the fake adapter's file-backed Dict
and the settings are the emulator's (through the fake adapter, as in a real session)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_modal import FakeModal, read_dict
from modal_emulator import ModalEmulator

from pytest_modal_vllm.leases import PARKED_WINDOW, LeaseBook
from pytest_modal_vllm.modal_sdk import ModalTarget, lease_dict_name

TARGET = ModalTarget("my-app")


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_server: Callable[..., Any]
) -> Callable[..., ModalEmulator]:
    """Factory: the emulator behind `my-app/serve` (deployed window 30 s unless given)."""
    monkeypatch.setenv("FAKE_MODAL_STATE", str(tmp_path / "state.json"))
    for name in ("FAKE_MODAL_CALLS", "FAKE_MODAL_DEPLOYED", "FAKE_MODAL_FAIL", "FAKE_MODAL_RAISE"):
        monkeypatch.delenv(name, raising=False)

    def start(**behaviour: Any) -> ModalEmulator:
        behaviour.setdefault("scaledown_window", 30.0)
        server = endpoint_server(**behaviour)
        monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps({"my-app/serve": server.root_url}))
        return server

    return start


def book(clock: Clock, mode: str = "autoscaler", **options: Any) -> LeaseBook:
    sdk = FakeModal()
    options.setdefault("interval", 10.0)  # TTL: 30 s
    return LeaseBook(sdk.leases(TARGET), sdk, TARGET, mode=mode, clock=clock, **options)


def min_containers(server: ModalEmulator) -> int:
    return int(server.autoscaler()["min_containers"])


def test_the_pin_holds_while_any_session_lives_and_the_last_one_restores(
    app: Callable[..., ModalEmulator],
) -> None:
    server, clock = app(), Clock()
    first, second = book(clock, holder={"user": "a"}), book(clock, holder={"user": "b"})
    first.arrive()
    assert min_containers(server) == 1
    second.arrive()
    assert {lease.who["user"] for lease in first.live()} == {"a", "b"}
    first.leave()
    assert min_containers(server) == 1  # b still runs: its container stays
    assert first.original() == {
        "min_containers": 0,
        "scaledown_window": 30,
        "parked": False,
        "by": first.session,
    }
    notes = second.leave()
    assert min_containers(server) == 0
    assert "restored min_containers to 0" in notes


def test_two_first_sessions_record_the_original_once(app: Callable[..., ModalEmulator]) -> None:
    app()
    clock = Clock()
    books = [book(clock) for _ in range(4)]
    barrier = threading.Barrier(len(books))

    def arrive(lease_book: LeaseBook) -> None:
        barrier.wait()
        lease_book.arrive()

    threads = [threading.Thread(target=arrive, args=(b,)) for b in books]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    record = books[0].original()
    assert record is not None
    # One of them recorded it, and what it recorded is the original 0, never a pin's 1.
    assert record["min_containers"] == 0
    assert record["by"] in {b.session for b in books}
    assert len(books[0].live()) == 4


def test_an_original_two_is_restored_as_two_and_someone_elses_pin_is_left(
    app: Callable[..., ModalEmulator],
) -> None:
    server, clock = app(min_containers=2), Clock()
    session = book(clock)
    session.arrive()
    assert min_containers(server) == 2  # already warm: nothing pinned
    session.leave()
    assert min_containers(server) == 2

    server.update_autoscaler({"min_containers": 0})
    clock.now += 1
    other = book(clock)
    other.arrive()  # the original is still 2 in the record? it was 2; someone set 0 since
    assert min_containers(server) == 1
    server.update_autoscaler({"min_containers": 3})  # someone pins more during the run
    other.heartbeat()
    other.leave()
    assert min_containers(server) == 3  # left as they set it


def test_a_heartbeat_re_asserts_a_lowered_pin(app: Callable[..., ModalEmulator]) -> None:
    server, clock = app(), Clock()
    session = book(clock)
    session.arrive()
    server.redeploy()  # a redeploy wipes every override: the pin is gone
    assert min_containers(server) == 0
    notes = session.heartbeat()
    assert min_containers(server) == 1
    assert notes == ["re-asserted the pin (min_containers was 0)"]
    session.leave()


def test_a_killed_sessions_lease_expires_and_whoever_looks_next_restores(
    app: Callable[..., ModalEmulator],
) -> None:
    server, clock = app(), Clock()
    killed = book(clock, holder={"user": "ci", "host": "runner-1", "pid": 7})
    killed.arrive()  # ... and never leaves (SIGKILL)
    assert min_containers(server) == 1
    clock.now += 29  # within the TTL: still live
    janitor = book(clock, mode="ping")
    assert janitor.release() == []
    assert min_containers(server) == 1
    clock.now += 2  # past the TTL
    notes = janitor.release()
    assert notes[0].startswith("cleared the lease of ci@runner-1 pid 7 since 31s, expired 1s ago")
    assert "restored min_containers to 0" in notes
    assert min_containers(server) == 0
    assert janitor.leases() == []


def test_the_last_session_parks_the_window_and_the_next_one_restores_it(
    app: Callable[..., ModalEmulator],
) -> None:
    server, clock = app(), Clock()
    session = book(clock, mode="ping")
    session.arrive()
    notes = session.leave()
    assert server.autoscaler()["scaledown_window"] == PARKED_WINDOW
    assert f"scale-down window {PARKED_WINDOW}s until the next session (was 30s)" in notes[-1]
    assert session.original() is not None and session.original()["parked"] is True  # type: ignore[index]
    clock.now += 100
    following = book(clock, mode="ping")
    notes = following.arrive()
    assert server.autoscaler()["scaledown_window"] == 30
    assert notes == ["restored the scale-down window to 30s"]
    following.leave()


def test_fast_scaledown_off_leaves_the_window_alone(app: Callable[..., ModalEmulator]) -> None:
    server, clock = app(), Clock()
    session = book(clock, mode="ping", fast_scaledown=False)
    session.arrive()
    session.leave()
    assert server.autoscaler()["scaledown_window"] == 30


def test_a_redeploy_while_parked_records_the_new_settings(
    app: Callable[..., ModalEmulator],
) -> None:
    server, clock = app(), Clock()
    first = book(clock, mode="ping")
    first.arrive()
    first.leave()
    server.redeploy()  # the override is wiped: the deployed window (30) is back
    second = book(clock, mode="ping")
    assert second.arrive() == []  # nothing to restore: it is the deployed window already
    assert server.autoscaler()["scaledown_window"] == 30
    assert second.original()["parked"] is False  # type: ignore[index]
    second.leave()


def test_one_session_pings_at_a_time_and_another_takes_over_when_it_expires(
    app: Callable[..., ModalEmulator],
) -> None:
    app()
    clock = Clock()
    first, second = book(clock, mode="ping"), book(clock, mode="ping")
    first.arrive()
    second.arrive()
    assert (first.pinging, second.pinging) == (True, False)
    assert first.pinger() == first.session
    clock.now += 31  # the first session stopped renewing (killed)
    second.heartbeat()
    assert second.pinging
    assert second.pinger() == second.session
    second.leave()
    assert second.pinger() is None


def test_the_store_is_the_apps_named_dict(
    app: Callable[..., ModalEmulator], tmp_path: Path
) -> None:
    app()
    clock = Clock()
    session = book(clock, holder={"user": "dev"})
    session.arrive()
    stored = read_dict(tmp_path / "state.json", "my-app")
    assert lease_dict_name(TARGET) == "modal-vllm-leases-my-app"
    lease = stored[f"lease:serve:{session.session}"]
    assert lease["who"] == {"user": "dev"}
    assert lease["expires"] - lease["started"] == 30.0  # TTL: three intervals
    assert "original:serve" in stored
    session.leave()
    assert f"lease:serve:{session.session}" not in read_dict(tmp_path / "state.json", "my-app")
    long = ModalTarget("x" * 63)
    assert len(lease_dict_name(long)) <= 63
