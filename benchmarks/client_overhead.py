"""Client overhead: the plugin's metered clients versus a plain `openai.OpenAI`.

Both talk to the same stub server (a separate process, so that server work does not share the
client's interpreter), in alternating blocks, sync and streaming; reported as the ratio of
median per-request times.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import openai
from emulator import EMULATOR_SCRIPT

from pytest_modal_vllm.clients import ClientFactory
from pytest_modal_vllm.endpoint import Endpoint
from pytest_modal_vllm.resolution import ClientOptions
from pytest_modal_vllm.usage import UsageMeter
from pytest_modal_vllm.wake import WakeRequest

REQUESTS = 300
BLOCK = 25
MESSAGES = [{"role": "user", "content": "measure the overhead of this client please"}]


def start_stub() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, str(EMULATOR_SCRIPT), "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    return process, line.strip().rsplit(" ", 1)[-1]


def one_sync(client: Any) -> None:
    client.chat.completions.create(model="stub", messages=MESSAGES)


def one_stream(client: Any) -> None:
    stream = client.chat.completions.create(
        model="stub", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    for _ in stream:
        pass


def timed_blocks(
    plain: Any, metered: Any, call: Callable[[Any], None]
) -> tuple[list[float], list[float]]:
    plain_times: list[float] = []
    metered_times: list[float] = []
    for _ in range(REQUESTS // BLOCK):
        for client, sink in ((plain, plain_times), (metered, metered_times)):
            for _ in range(BLOCK):
                started = time.perf_counter()
                call(client)
                sink.append(time.perf_counter() - started)
    return plain_times, metered_times


def main() -> dict[str, float]:
    process, base_url = start_stub()
    try:
        plain = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
        endpoint = Endpoint(platform="bench", base_url=base_url, model="stub")
        meter = UsageMeter()
        rewake = WakeRequest("bench", base_url, timeout=60).rewake
        metered = ClientFactory(endpoint, ClientOptions(), meter, rewake).openai_client()
        for client in (plain, metered):  # warm connections and code paths
            one_sync(client)
            one_stream(client)
        result: dict[str, float] = {}
        for name, call in (("sync", one_sync), ("streaming", one_stream)):
            plain_times, metered_times = timed_blocks(plain, metered, call)
            result[f"{name}_plain_ms"] = statistics.median(plain_times) * 1000
            result[f"{name}_metered_ms"] = statistics.median(metered_times) * 1000
            result[f"{name}_ratio"] = result[f"{name}_metered_ms"] / result[f"{name}_plain_ms"]
        counted = meter.snapshot()["bench"]["requests"]
        result["metered_requests_counted"] = counted
        return {k: round(v, 3) for k, v in result.items()}
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
