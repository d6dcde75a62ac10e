"""`pytest_modal_vllm.current_endpoint()`: the woken endpoint outside fixtures, in the
controller and in xdist workers, following the platform of the running test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FAST

SUITE = """
import os

import pytest
from pytest_modal_vllm import current_endpoint
from pytest_modal_vllm.current import chat_model_kwargs

# At import, i.e. while collecting: in the controller and in every xdist worker.
AT_COLLECTION = current_endpoint()


def helper_that_cannot_take_fixtures():
    return current_endpoint()


@pytest.mark.parametrize("i", range(4))
def test_same_as_the_fixture(vllm_endpoint, i):
    assert helper_that_cannot_take_fixtures() == vllm_endpoint == AT_COLLECTION
    print("worker", os.environ.get("PYTEST_XDIST_WORKER", "controller"))


def test_plain_test_without_fixtures():
    assert current_endpoint().model == "m1"


def test_chat_model_kwargs_are_the_plugins_own_clients():
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(**chat_model_kwargs())
    assert model.invoke("hi").content == "echo: hi"
"""


@pytest.mark.parametrize("workers", ["0", "2"])
def test_in_the_controller_and_in_xdist_workers(
    pytester, endpoint_server, write_platforms, tmp_path, workers
) -> None:
    server = endpoint_server(model="m1")
    write_platforms({"one": {"kind": "url", "base_url": server.base_url}})
    pytester.makepyfile(test_current=SUITE)
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-n", workers, "--vllm-platform=one", f"--vllm-report={report}", "-rA"
    )
    result.assert_outcomes(passed=6)
    if workers == "2":
        result.stdout.fnmatch_lines(["worker gw*"])
    # The kwargs carry the plugin's metered clients: the request is in the usage report.
    (row,) = json.loads(report.read_text())["platforms"]
    assert row["requests"] == 1


SEVERAL = """
import pytest
from pytest_modal_vllm import EndpointLookupError, current_endpoint


def test_follows_the_running_test(vllm_platform):
    assert current_endpoint().platform == vllm_platform


def test_by_name():
    assert current_endpoint("b").model == "mb"


def test_ambiguous_outside_a_platform_test():
    with pytest.raises(EndpointLookupError, match=r"2 platforms are selected \\(a, b\\)"):
        current_endpoint()


def test_unknown_name():
    with pytest.raises(EndpointLookupError, match="platform 'c' is not selected"):
        current_endpoint("c")
"""


def test_several_platforms(pytester, endpoint_server, write_platforms) -> None:
    first, second = endpoint_server(model="ma"), endpoint_server(model="mb")
    write_platforms(
        {
            "a": {"kind": "url", "base_url": first.base_url},
            "b": {"kind": "url", "base_url": second.base_url},
        }
    )
    pytester.makepyfile(test_several=SEVERAL)
    result = pytester.runpytest_subprocess(*FAST, "--vllm-platform=a,b", "-v")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*test_follows_the_running_test?a? PASSED*"])


def test_no_platform_skips_inside_a_test_with_the_fixtures_reason(pytester) -> None:
    pytester.makepyfile(
        test_none="from pytest_modal_vllm import current_endpoint\n\n"
        "def test_x():\n    current_endpoint()\n"
    )
    result = pytester.runpytest_subprocess(*FAST, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no LLM platform selected: pass --vllm-platform=NAME*"])


def test_unavailable_platform_skips_inside_a_test(pytester, write_platforms) -> None:
    write_platforms(
        {"gone": {"kind": "url", "base_url": "http://127.0.0.1:9/v1", "wake_timeout": 1}}
    )
    pytester.makepyfile(
        test_gone="from pytest_modal_vllm import current_endpoint\n\n"
        "def test_x():\n    current_endpoint()\n"
    )
    result = pytester.runpytest_subprocess(
        *FAST, "--vllm-platform=gone", "--vllm-unavailable=skip", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*vllm platform 'gone'*"])


def test_outside_any_pytest_run_it_says_so() -> None:
    code = (
        "from pytest_modal_vllm import EndpointLookupError, current_endpoint\n"
        "try:\n    current_endpoint()\nexcept EndpointLookupError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no pytest run with pytest-modal-vllm is active in this process" in done.stdout
    assert "Fix:" in done.stdout
