"""The `process` kind: a local OpenAI-compatible server started as a child process.

The command's `{port}` and `{host}` are filled in (a free loopback port), its output
goes to a log file, and it runs in its own process group so that stopping it stops its children
too: SIGTERM to the group, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import ConfigError
from ..resolution import ResolvedPlatform
from .base import NOT_RUNNING

HOST = "127.0.0.1"
STOP_GRACE = 10.0
LOG_TAIL_LINES = 15


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file (empty if it cannot be read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class ProcessWatch:
    """Watches a server process from any process (xdist workers are not its parent).

    Calling it says why the process is gone (with its log tail), or None while it runs.
    """

    pid: int
    log_path: str

    def __call__(self) -> str | None:
        """Why the process is gone, or None while it runs (a zombie counts as gone)."""
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        except (OSError, IndexError):  # no /proc: ask the kernel whether the pid exists
            try:
                os.kill(self.pid, 0)
                state = "R"
            except ProcessLookupError:
                state = "gone"
            except PermissionError:
                state = "R"
        if state not in ("Z", "X", "gone"):
            return None
        return _death(f"the process (pid {self.pid}) exited", Path(self.log_path))


def _death(what: str, log_path: Path | None) -> str:
    tail = log_tail(log_path) if log_path else ""
    where = f" (log: {log_path})" if log_path else ""
    return f"{what}{where}; last lines:\n{tail}" if tail else f"{what}{where}"


class ProcessProvider:
    """Starts the command on a free port, reports its death, and stops it with its children."""

    OPTIONS = ("log_dir",)
    wake_note: str | None = None

    def __init__(self, platform: ResolvedPlatform, *, log_dir: Path | None = None) -> None:
        self.platform = platform
        self.notes: list[str] = []
        self.log_dir = log_dir or Path(tempfile.gettempdir()) / "pytest-modal-vllm"
        self.log_path: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def argv(self, port: int) -> list[str]:
        """The command with `{port}` and `{host}` filled in (`{model}` already is)."""
        return [
            arg.replace("{port}", str(port)).replace("{host}", HOST)
            for arg in self.platform.command
        ]

    def start(self) -> str:
        """Spawn the server; its readiness is the wake's job. Returns its base URL."""
        platform = self.platform
        if platform.preflight is not None:
            platform.preflight()
        port = free_port()
        argv = self.argv(port)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{platform.name}-{os.getpid()}-{port}.log"
        self._log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **platform.env},
                start_new_session=True,  # own process group: stop() reaches its children
            )
        except OSError as error:
            self._close_log()
            raise ConfigError(
                f"cannot start {argv[0]!r}: {error.strerror or error}",
                "check the platform's command (is the program installed and on PATH?)",
                platform=platform.name,
            ) from None
        return f"http://{HOST}:{port}/v1"

    def failure(self) -> str | None:
        """Why the process is gone (exit code and log tail), or None while it runs."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            return None
        return _death(f"exit code {code}", self.log_path)

    def watch(self) -> ProcessWatch | None:
        """The same check for processes that are not the server's parent (xdist workers)."""
        if self.process is None or self.log_path is None:
            return None
        return ProcessWatch(self.process.pid, str(self.log_path))

    def status(self) -> list[str]:
        """A process platform runs only inside a session."""
        return [NOT_RUNNING]

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; idempotent."""
        process, self.process = self.process, None
        if process is not None:
            _stop_group(process)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _stop_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    _signal_group(pgid, process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # Kill the whole group even if the leader exited: its children may still run.
    _signal_group(pgid, process, signal.SIGKILL)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
        pass


def _signal_group(pgid: int | None, process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        elif process.poll() is None:
            process.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass
