"""GPU cost model on the Modal emulator: billed container time and cold starts per keep-alive.

A session of requests separated by idle gaps longer than the scale-down window runs against
the emulator (`ModalEmulator` with `scaledown_window`, hold-style cold starts, billing counters),
through the plugin's own wake, clients and keep-alive, under four strategies:

- `off`: no keep-alive; every request after a gap waits through a new cold start;
- `ping`: the plugin's ping thread keeps the container up;
- `autoscaler`: `min_containers=1` for the session (emulated: no scale-down while pinned);
- `ephemeral`: like `ping`, but the app is stopped at session end, so there is no idle tail.

Time is scaled: 1 emulator second stands for 1 minute of a real deployment (scale-down window
2 -> 2 min, cold start 1 -> 1 min). Money is stated at an assumed GPU price per hour.
"""

from __future__ import annotations

import json
import time
from typing import Any

from emulator import EmulatorBehaviour, ModalEmulator

from pytest_modal_vllm.clients import ClientFactory
from pytest_modal_vllm.endpoint import Endpoint
from pytest_modal_vllm.keepalive import PingKeepAlive
from pytest_modal_vllm.resolution import ClientOptions
from pytest_modal_vllm.usage import UsageMeter
from pytest_modal_vllm.wake import Waker, WakeRequest

WINDOW = 2.0
COLD_START = 1.0
GAPS = (3.0, 3.0, 3.0)
SCALE = 60.0  # real seconds per emulator second
GPU_PRICE_PER_HOUR = 3.95  # assumed H100 list price, USD


def session(strategy: str) -> dict[str, Any]:
    server = ModalEmulator(
        behaviour=EmulatorBehaviour(
            cold_start=COLD_START, cold_style="hold", scaledown_window=WINDOW
        )
    ).start()
    try:
        wake = WakeRequest("emu", server.base_url, timeout=60)
        result = Waker(wake).run()
        endpoint = Endpoint(
            platform="emu",
            base_url=server.base_url,
            model=result.model,
            wake_seconds=result.seconds,
            cold=result.cold,
        )
        keepalive = None
        if strategy in ("ping", "ephemeral"):
            keepalive = PingKeepAlive("emu", endpoint.root_url, WINDOW / 2).start()
        if strategy == "autoscaler":
            server.behaviour.scaledown_window = None  # pinned: min_containers=1
        client = ClientFactory(endpoint, ClientOptions(), UsageMeter(), wake.rewake).openai_client()
        started = time.monotonic()
        for gap in (0.0, *GAPS):
            time.sleep(gap)
            client.chat.completions.create(
                model=endpoint.model, messages=[{"role": "user", "content": "hi"}]
            )
        session_seconds = time.monotonic() - started + result.seconds
        if keepalive is not None:
            keepalive.stop()
        if strategy == "autoscaler":
            server.behaviour.scaledown_window = WINDOW  # restored at session end
            client.models.list()  # the restore is an API call: the window counts from now
        at_end = server.stats.billed_seconds()
        if strategy == "ephemeral":
            server.scale_to_zero()  # the ephemeral app stops with the session
        else:
            time.sleep(WINDOW + 0.5)  # let the idle tail run out
        billed = server.stats.billed_seconds()
        return {
            "cold_starts": server.stats.cold_starts,
            "session_s": round(session_seconds, 2),
            "billed_s": round(billed, 2),
            "idle_tail_s": round(billed - at_end, 2),
            "usd_scaled": round(billed * SCALE / 3600 * GPU_PRICE_PER_HOUR, 2),
        }
    finally:
        server.stop()


def main() -> dict[str, dict[str, Any]]:
    return {strategy: session(strategy) for strategy in ("off", "ping", "autoscaler", "ephemeral")}


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
