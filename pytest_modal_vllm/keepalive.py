"""Keep an endpoint warm from the wake until the session ends.

`ping`: a daemon thread per platform sends `GET <root>/health` every `keep_alive_interval`
seconds (a request inside Modal's `scaledown_window` keeps the container up).
`autoscaler`: pins `min_containers=1` on the Modal function through the provider, and restores
the value it read before at the end.

A deployed modal platform shares both with every other session on the app through a lease
(`leases.LeaseBook`): the same thread then renews the lease at each interval and pings only
while this session is the one that pings; the pin is the lease book's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from .errors import PlatformError

if TYPE_CHECKING:
    from .leases import LeaseBook


class KeepAlive(Protocol):
    """A running keep-alive; `stop()` ends it and undoes what it changed."""

    pings: int
    notes: list[str]

    def stop(self) -> None:
        """Stop; safe to call twice."""
        ...


class PingKeepAlive:
    """Pings `<root>/health` every `interval` seconds in a daemon thread until stopped; with a
    lease `book`, renews the lease at each interval and pings only while the book says so."""

    def __init__(
        self,
        platform: str,
        root_url: str,
        interval: float,
        headers: Mapping[str, str] | None = None,
        book: LeaseBook | None = None,
    ) -> None:
        self.platform = platform
        self.root_url = root_url
        self.interval = interval
        self.headers = dict(headers or {})
        self.book = book
        self.pings = 0
        self.failures = 0
        # What the lease book did worth telling (cleared leases, a re-asserted pin, ...).
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"vllm-keepalive-{platform}", daemon=True
        )

    def start(self) -> PingKeepAlive:
        """Take the lease (if any), start the thread; returns self."""
        if self.book is not None:
            self.notes += self.book.arrive()
        self._thread.start()
        return self

    def _run(self) -> None:
        import httpx

        from .probe import check_health

        with httpx.Client(headers=self.headers, follow_redirects=True) as client:
            # A fixed rate: the time a ping or a heartbeat takes does not push the next one
            # later (a scale-down window is counted from the last request).
            due = time.monotonic() + self.interval
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                due = max(due + self.interval, time.monotonic())
                if self.book is None or self.book.pinging:
                    # A held ping would only delay the next one: give up after an interval.
                    answer = check_health(self.root_url, {}, max(1.0, self.interval), client)
                    if answer.error is None:
                        self.pings += 1
                    else:
                        self.failures += 1
                if self.book is not None:
                    try:
                        self.notes += self.book.heartbeat()
                    except PlatformError as error:  # Modal hiccup: the next beat tries again
                        self.notes.append(f"a lease heartbeat failed: {error.problem}")

    def stop(self) -> None:
        """Stop the thread and wait for it (an in-flight ping is bounded by its timeout);
        give the lease back (the last session out restores the app's settings)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(2.0, self.interval + 1.0))
        book, self.book = self.book, None
        if book is not None:
            self.notes += book.leave()


class Pinnable(Protocol):
    """What the `autoscaler` mode needs from a provider (the Modal provider has it)."""

    def pin(self) -> None:
        """Set min_containers=1, remembering the previous value."""
        ...

    def unpin(self) -> None:
        """Restore the previous min_containers."""
        ...


class AutoscalerKeepAlive:
    """Pins `min_containers=1` at start; restores the previous value at `stop()`."""

    pings = 0

    def __init__(self, provider: Pinnable) -> None:
        self.provider = provider
        self.notes: list[str] = []
        self._pinned = False

    def start(self) -> AutoscalerKeepAlive:
        """Pin the autoscaler; returns self."""
        self._pinned = True  # set first: a failure half-way must still restore
        self.provider.pin()
        return self

    def stop(self) -> None:
        """Restore the previous min_containers, once."""
        if self._pinned:
            self._pinned = False
            self.provider.unpin()
