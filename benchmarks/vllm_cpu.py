"""The real vLLM CPU server: its cold start, and the lag the plugin's wake adds on top.

The server is started by the plugin's own `process` provider from
examples/platforms/vllm-cpu.toml. A reference poller (GET /health every 10 ms, in its own
thread) marks the moment the server answers; the plugin's `Waker` runs at the same time, and
the difference is the detection lag the plugin adds. Needs scripts/setup_vllm_cpu.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx

from pytest_modal_vllm.platforms import load_platforms
from pytest_modal_vllm.providers.process import ProcessProvider
from pytest_modal_vllm.resolution import resolve_platform
from pytest_modal_vllm.settings import resolve
from pytest_modal_vllm.wake import Waker, WakeRequest

PLATFORM_FILE = Path(__file__).resolve().parent.parent / "examples/platforms/vllm-cpu.toml"


def main() -> dict[str, float]:
    platform = load_platforms(None, str(PLATFORM_FILE))["vllm-cpu"]
    resolved = resolve_platform(platform, resolve({}, {}, {}))
    provider = ProcessProvider(resolved)
    spawned = time.monotonic()
    base_url = provider.start()
    root = base_url[: -len("/v1")]
    reference: dict[str, float] = {}

    def poll() -> None:
        while "ready" not in reference and time.monotonic() - spawned < 600:
            try:
                if httpx.get(f"{root}/health", timeout=1.0).status_code == 200:
                    reference["ready"] = time.monotonic()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        Waker(WakeRequest.of(resolved, base_url, provider.failure)).run()
        plugin_ready = time.monotonic()
        poller.join(timeout=5)
    finally:
        provider.stop()
    return {
        "cold_start_s": round(reference["ready"] - spawned, 2),
        "plugin_lag_s": round(plugin_ready - reference["ready"], 3),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
