"""Leases: many sessions on many machines keeping one Modal app warm together, on Modal itself.

Every session that keeps a deployed modal platform warm holds a lease in the app's named
`modal.Dict` (`modal-vllm-leases-<app>`, created on first use), under `lease:<target>:<id>`:
who (host, user, pid, CI run), since when, until when. A heartbeat renews it every
`keep_alive_interval`; a lease not renewed for `TTL_INTERVALS` intervals has expired (its
session was killed) and is cleared by whoever looks next: another session's heartbeat, a new
session, `modal-vllm status` or `modal-vllm release`.

- The first session records the app's original autoscaler settings under `original:<target>`
  with an atomic create (`put(..., skip_if_exists=True)`), so two first sessions cannot both
  record, and a later one never records a pin as the original.
- `autoscaler` mode pins `min_containers=1` while any unexpired lease exists; a heartbeat
  re-asserts the pin if it was lowered. `ping` mode holds a lease for visibility, and one
  session at a time pings (`pinger:<target>`, taken over when its holder's lease expired).
- The last session out (or whoever clears the last expired lease) restores `min_containers`,
  if the pin is still what was written (a value someone else set is left as they set it), and
  shortens the scale-down window to `PARKED_WINDOW` seconds so that the container goes within
  seconds instead of idling (and billing) through the whole window (`parked`); the next session
  to arrive restores the original window. `fast_scaledown = false` turns the parking off.

All calls go through the Modal adapter (the store and the autoscaler); none wakes a container.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PlatformError
from .modal_sdk import Autoscaler, LeaseStore, ModalBackend, ModalTarget

# Modal's smallest scale-down window: an idle container goes within seconds.
PARKED_WINDOW = 2
# A lease expires after this many missed heartbeats.
TTL_INTERVALS = 3


def session_id() -> str:
    """A session's id: `host:pid:random` (unique across machines and restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def who(platform: str) -> dict[str, Any]:
    """Who holds a lease: host, user, pid, the CI run when on GitHub Actions, the platform."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = "unknown"
    run = os.environ.get("GITHUB_RUN_ID")
    if run and os.environ.get("GITHUB_JOB"):
        run += f" ({os.environ['GITHUB_JOB']})"
    return {"host": socket.gethostname(), "user": user, "pid": os.getpid(), "ci_run": run,
            "platform": platform}  # fmt: skip


@dataclass(frozen=True)
class Lease:
    """One session's lease, as stored."""

    session: str
    who: dict[str, Any]
    mode: str
    started: float
    expires: float

    def describe(self, now: float) -> str:
        """`user@host pid 123 (CI run 42) since 3m12s, expires in 2m, mode ping`."""
        ci = f" (CI run {self.who['ci_run']})" if self.who.get("ci_run") else ""
        left = self.expires - now
        state = f"expires in {_span(left)}" if left > 0 else f"expired {_span(-left)} ago"
        return (
            f"{self.who.get('user')}@{self.who.get('host')} pid {self.who.get('pid')}{ci} "
            f"since {_span(now - self.started)}, {state}, {self.mode}"
        )


def _span(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class LeaseBook:
    """This session's lease on one Modal target, and the shared state beside it."""

    def __init__(
        self,
        store: LeaseStore,
        sdk: ModalBackend,
        target: ModalTarget,
        *,
        mode: str,
        interval: float,
        fast_scaledown: bool = True,
        holder: dict[str, Any] | None = None,
        session: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.sdk, self.target = store, sdk, target
        self.mode = mode
        self.ttl = TTL_INTERVALS * interval
        self.fast_scaledown = fast_scaledown
        self.holder = holder or {}
        self.session = session or session_id()
        self.clock = clock
        self.pinging = False
        self._prefix = f"lease:{target.name}:"
        self._original_key = f"original:{target.name}"
        self._pinger_key = f"pinger:{target.name}"

    # ------------------------------------------------------------------ a session

    def arrive(self) -> list[str]:
        """Take a lease, clear expired ones, record or unpark the original settings, pin or
        claim the pinging; what happened worth telling."""
        self._renew()
        notes = self._clear(expired_only=True)
        try:
            current: Autoscaler | None = self.sdk.autoscaler(self.target)
        except PlatformError as error:
            current = None
            if self.mode == "autoscaler":  # a value not read is never written back
                self.mode = "ping"
                self._renew()
                notes.append(
                    "WARNING: keep-alive 'autoscaler' fell back to 'ping': its autoscaler "
                    f"settings could not be read ({error.problem}); nothing was pinned"
                )
        if current is not None:
            notes += self._unpark(current)
            if self.mode == "autoscaler" and current.min_containers < 1:
                self.sdk.update_autoscaler(self.target, min_containers=1)
        self._claim_pinger()
        return notes

    def heartbeat(self) -> list[str]:
        """Renew the lease, clear expired ones, keep the pin and the pinging going."""
        self._renew()
        notes = self._clear(expired_only=True)
        if self.mode == "autoscaler":
            current = self.sdk.autoscaler(self.target)
            notes += self._unpark(current)  # another session took itself for the last one
            if current.min_containers < 1:
                self.sdk.update_autoscaler(self.target, min_containers=1)
                notes.append(f"re-asserted the pin (min_containers was {current.min_containers})")
        self._claim_pinger()
        return notes

    def leave(self) -> list[str]:
        """Give the lease back; the last one out restores the original settings."""
        self.store.pop(self._prefix + self.session)
        if self.pinging:
            self.store.pop(self._pinger_key)
            self.pinging = False
        return self._settle()

    # ------------------------------------------------------------------ for everyone

    def leases(self) -> list[Lease]:
        """Every lease on the target, expired ones included."""
        found = []
        for key, value in self.store.items():
            if str(key).startswith(self._prefix) and isinstance(value, dict):
                found.append(Lease(str(key)[len(self._prefix) :], **value))
        return sorted(found, key=lambda lease: lease.started)

    def live(self) -> list[Lease]:
        """The unexpired leases."""
        now = self.clock()
        return [lease for lease in self.leases() if lease.expires > now]

    def original(self) -> dict[str, Any] | None:
        """The recorded original settings (`min_containers`, `scaledown_window`, `parked`)."""
        record = self.store.get(self._original_key)
        return dict(record) if isinstance(record, dict) else None

    def pinger(self) -> str | None:
        """The session that pings (ping mode), if any."""
        record = self.store.get(self._pinger_key)
        return str(record["session"]) if isinstance(record, dict) else None

    def release(self, *, everything: bool = False) -> list[str]:
        """Clear expired leases (or all of them), then restore the settings if none is left."""
        return self._clear(expired_only=not everything) + self._settle()

    # ------------------------------------------------------------------ the parts

    def _renew(self) -> None:
        now = self.clock()
        key = self._prefix + self.session
        held = self.store.get(key)
        started = held["started"] if isinstance(held, dict) else now
        value = {"who": self.holder, "mode": self.mode, "started": started,
                 "expires": now + self.ttl}  # fmt: skip
        self.store.put(key, value)

    def _clear(self, *, expired_only: bool) -> list[str]:
        now = self.clock()
        notes = []
        for lease in self.leases():
            if lease.session == self.session or (expired_only and lease.expires > now):
                continue
            self.store.pop(self._prefix + lease.session)
            notes.append(f"cleared the lease of {lease.describe(now)}")
        pinger = self.store.get(self._pinger_key)
        if isinstance(pinger, dict) and (not expired_only or pinger["expires"] <= now):
            self.store.pop(self._pinger_key)
        return notes

    def _unpark(self, current: Autoscaler) -> list[str]:
        """Make sure the original settings are recorded, and the window is not parked."""
        record = self.original()
        if record is None:
            fresh: dict[str, Any] = {
                "min_containers": current.min_containers,
                "scaledown_window": current.scaledown_window,
                "parked": False,
                "by": self.session,
            }
            if self.store.put(self._original_key, fresh, skip_if_exists=True):
                if current.scaledown_window == PARKED_WINDOW:
                    return [
                        f"the scale-down window is {PARKED_WINDOW}s with no record of the "
                        "original: redeploy the app to restore its own window"
                    ]
                return []
            record = self.original() or fresh  # another first session recorded it
        if not record.get("parked"):
            return []
        notes = []
        if current.scaledown_window == PARKED_WINDOW and record.get("scaledown_window"):
            self.sdk.update_autoscaler(
                self.target, scaledown_window=int(record["scaledown_window"])
            )
            notes.append(f"restored the scale-down window to {record['scaledown_window']}s")
            record = {**record, "min_containers": current.min_containers, "parked": False}
        else:  # redeployed or changed while parked: what is set now is the original
            record = {
                "min_containers": current.min_containers,
                "scaledown_window": current.scaledown_window,
                "parked": False,
                "by": self.session,
            }
        self.store.put(self._original_key, record)
        return notes

    def _claim_pinger(self) -> None:
        if self.mode != "ping":
            self.pinging = False
            return
        now = self.clock()
        mine = {"session": self.session, "expires": now + self.ttl}
        held = self.store.get(self._pinger_key)
        if isinstance(held, dict) and held.get("session") == self.session:
            self.store.put(self._pinger_key, mine)
            self.pinging = True
        elif isinstance(held, dict) and held.get("expires", 0) > now:
            self.pinging = False  # someone else pings
        else:
            if held is not None:
                self.store.pop(self._pinger_key)
            self.pinging = self.store.put(self._pinger_key, mine, skip_if_exists=True)

    def _settle(self) -> list[str]:
        """With no live lease left: restore min_containers and park the window."""
        if self.live():
            return []
        record = self.original()
        if record is None:
            return []
        current = self.sdk.autoscaler(self.target)
        notes = []
        original_min = int(record["min_containers"])
        # Only the pin this plugin wrote is undone: a value someone else set stays.
        if current.min_containers == 1 and original_min != 1:
            self.sdk.update_autoscaler(self.target, min_containers=original_min)
            notes.append(f"restored min_containers to {original_min}")
        window = record.get("scaledown_window")
        if self.fast_scaledown and window and window != PARKED_WINDOW and not record["parked"]:
            self.sdk.update_autoscaler(self.target, scaledown_window=PARKED_WINDOW)
            self.store.put(self._original_key, {**record, "parked": True})
            notes.append(
                f"the last session left: scale-down window {PARKED_WINDOW}s until the next "
                f"session (was {window}s)"
            )
        arrived = self.live()  # read again: a session may have arrived meanwhile
        if arrived:  # give it back what it expects
            notes += self._unpark(self.sdk.autoscaler(self.target))
            if any(lease.mode == "autoscaler" for lease in arrived):
                self.sdk.update_autoscaler(self.target, min_containers=1)
        return notes
