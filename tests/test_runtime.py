"""The xdist hand-over: what the controller puts in `workerinput` is plain data, and a worker
rebuilds from it the same endpoints, client defaults, capabilities and re-wake."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pytest_modal_vllm.endpoint import Endpoint
from pytest_modal_vllm.providers.process import ProcessWatch
from pytest_modal_vllm.resolution import ClientOptions
from pytest_modal_vllm.runtime import Runtime
from pytest_modal_vllm.session import ReadyPlatform
from pytest_modal_vllm.settings import resolve
from pytest_modal_vllm.wake import WakeRequest


def controller_runtime(watch: ProcessWatch | None = None) -> Runtime:
    runtime = Runtime(settings=resolve({"platform": ["p", "gone"]}, {}, {}))
    endpoint = Endpoint(
        "p", "http://127.0.0.1:1/v1", "m", api_key="sk-1", headers={"Modal-Key": "k"}
    )
    wake = WakeRequest("p", endpoint.base_url, 42.0, "m", "sk-1", "MY_KEY", {"Modal-Key": "k"})
    client = ClientOptions(timeout=5.0, max_tokens=64, extra_body={"top_k": 1})
    runtime.ready = {"p": ReadyPlatform(endpoint, client, wake, watch)}
    runtime.unavailable = {"gone": "vllm platform 'gone': did not become ready."}
    runtime._capabilities = {"p": ("streaming", "tools"), "gone": ("streaming",)}
    return runtime


def test_the_handover_round_trips_through_plain_data() -> None:
    controller = controller_runtime()
    data = json.loads(json.dumps(controller.to_workerinput()))  # execnet carries plain data
    worker = Runtime(settings=controller.settings)
    worker.load_workerinput(data)
    sent, got = controller.ready["p"], worker.ready["p"]
    assert got.endpoint == sent.endpoint
    assert got.client == sent.client
    assert got.wake == sent.wake  # the same request; only the dead-process check differs
    assert worker.unavailable == controller.unavailable
    assert worker.capabilities == controller.capabilities
    assert worker.report_platforms() == controller.report_platforms()
    assert worker.factory("p").options.max_tokens == 64


def test_a_worker_watches_the_controllers_process_through_the_handover() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = ProcessWatch(child.pid, os.devnull)
        data = json.loads(json.dumps(controller_runtime(watch).to_workerinput()))
        worker = Runtime(settings=resolve({}, {}, {}))
        worker.load_workerinput(data)
        failure = worker.ready["p"].wake.failure
        assert failure() is None  # alive
        child.kill()
        child.wait()
        # Reaped here, gone from /proc: a worker sees it exited.
        message = failure()
        assert message is not None and f"pid {child.pid}" in message
    finally:
        child.kill()
        child.wait()
