"""`python -m pytest_modal_vllm.stub`: a stub server in the foreground, until SIGTERM or SIGINT.

It always runs a `ModalEmulator`: with every emulator switch off (the defaults), that is the
plain stub. A cheap child process for tests of the `process` platform kind and for benchmarks.
"""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import fields

from .emulator import COLD_STYLES, FAIL_MODES, EmulatorBehaviour, ModalEmulator

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run a stub server in the foreground until SIGTERM or SIGINT; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m pytest_modal_vllm.stub",
        description="Deterministic OpenAI-compatible stub server (a Modal emulator).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="stub")
    parser.add_argument("--script", default=None, help="TOML rules file")
    parser.add_argument("--cold-start", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    emulator = parser.add_argument_group("Modal emulator and faults")
    emulator.add_argument("--cold-style", choices=COLD_STYLES, default="refuse-then-503")
    emulator.add_argument("--redirect-after", type=float, default=None)
    emulator.add_argument("--proxy-auth", nargs=2, metavar=("KEY", "SECRET"), default=None)
    emulator.add_argument("--scaledown-window", type=float, default=None)
    emulator.add_argument("--fail-rate", type=float, default=0.0)
    emulator.add_argument("--fail-mode", choices=FAIL_MODES, default="503")
    emulator.add_argument("--seed", type=int, default=0)
    emulator.add_argument("--response-delay", type=float, default=0.0)
    emulator.add_argument("--health-hang", action="store_true")
    emulator.add_argument(
        "--startup-exit", metavar="MESSAGE", help="every boot fails after the cold start"
    )
    emulator.add_argument("--min-containers", type=int, default=0)
    emulator.add_argument("--max-containers", type=int, default=None)
    emulator.add_argument("--buffer-containers", type=int, default=0)
    emulator.add_argument("--autoscaler-unreadable", action="store_true")
    args = parser.parse_args(argv)
    if args.proxy_auth is not None:
        args.proxy_auth = tuple(args.proxy_auth)

    try:
        behaviour = EmulatorBehaviour(
            **{f.name: getattr(args, f.name) for f in fields(EmulatorBehaviour)}
        )
        server = ModalEmulator(
            host=args.host,
            port=args.port,
            model=args.model,
            script=args.script,
            behaviour=behaviour,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        # Short waits so the signal handler (main thread only) runs promptly.
        while not stopping.is_set() and not server.wait_listening(0.1):
            pass
        if not stopping.is_set():
            print(f"stub server ready at {server.base_url}", flush=True)
        while not stopping.wait(0.2):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
