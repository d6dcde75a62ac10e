"""Concurrent wake: three platforms with different cold starts, total versus the slowest."""

from __future__ import annotations

import json
import time

from emulator import EmulatorBehaviour, ModalEmulator

from pytest_modal_vllm.wake import WakeRequest, wake_all

COLD_STARTS = {"refuse-1s": (1.0, "refuse"), "503-2s": (2.0, "503"), "hold-3s": (3.0, "hold")}


def main() -> dict[str, float]:
    servers = {
        name: ModalEmulator(behaviour=EmulatorBehaviour(cold_start=cold, cold_style=style)).start()
        for name, (cold, style) in COLD_STARTS.items()
    }
    try:
        started = time.monotonic()
        results = wake_all([WakeRequest(n, s.base_url, timeout=60) for n, s in servers.items()])
        total = time.monotonic() - started
    finally:
        for server in servers.values():
            server.stop()
    slowest = max(cold for cold, _ in COLD_STARTS.values())
    summed = sum(cold for cold, _ in COLD_STARTS.values())
    assert all(not isinstance(r, Exception) for r in results.values())
    return {
        "total_s": round(total, 3),
        "slowest_cold_start_s": slowest,
        "sum_of_cold_starts_s": summed,
        "ratio_to_slowest": round(total / slowest, 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
