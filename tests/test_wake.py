"""The readiness state machine: `classify` (pure) and `Waker`/`wake_all` against real fake
endpoints on 127.0.0.1 (never mocked HTTP). Timing asserts are generous bounds, not benchmarks."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import API_KEY, PROXY_KEY, PROXY_SECRET

from pytest_modal_vllm.errors import ConfigError, PlatformError, UnavailableError
from pytest_modal_vllm.stub import StubServer
from pytest_modal_vllm.wake import (
    Outcome,
    Verdict,
    Waker,
    WakeRequest,
    WakeResult,
    WakeState,
    classify,
    wake_all,
)

# ---------------------------------------------------------------------------- classify


def test_classify_200_is_ready_in_both_phases() -> None:
    assert classify("health", 200).verdict is Verdict.READY
    assert classify("models", 200, '{"data": []}').verdict is Verdict.READY


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_classify_redirect_with_location(status: int) -> None:
    outcome = classify("health", status, location="/__result/7")
    assert outcome.verdict is Verdict.REDIRECT
    assert outcome.location == "/__result/7"
    assert str(status) in outcome.label


def test_classify_redirect_without_location_is_not_followed() -> None:
    assert classify("health", 303).verdict is Verdict.CONFIG


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("phase", ["health", "models"])
def test_classify_auth_errors_are_config_errors(status: int, phase: str) -> None:
    plain = classify(phase, status, '{"error": "Unauthorized"}')
    assert plain.verdict is Verdict.CONFIG
    assert plain.label == str(status)
    assert "proxy" not in plain.problem

    proxy = classify(phase, status, "modal-http: missing credentials for proxy authorization")
    assert proxy.verdict is Verdict.CONFIG
    assert "Modal proxy auth is required" in proxy.problem
    assert "proxy_auth = true" in proxy.fix
    assert "MODAL_PROXY_TOKEN_ID" in proxy.fix

    wrong = classify(phase, status, "modal-http: invalid credentials for proxy authorization")
    assert wrong.verdict is Verdict.CONFIG
    assert "proxy auth token was rejected" in wrong.problem
    assert "MODAL_PROXY_TOKEN_SECRET" in wrong.fix


def test_classify_404_means_no_health_endpoint_but_a_wrong_url_on_models() -> None:
    assert classify("health", 404).verdict is Verdict.NO_HEALTH
    models = classify("models", 404)
    assert models.verdict is Verdict.CONFIG
    assert "GET /v1/models answered 404" in models.problem
    assert "/v1" in models.fix


def test_classify_405_on_health_is_no_health_endpoint() -> None:
    assert classify("health", 405).verdict is Verdict.NO_HEALTH
    assert classify("health", 501).verdict is Verdict.NO_HEALTH
    assert classify("models", 405).verdict is Verdict.CONFIG


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (429, "429 Too Many Requests"),
        (500, "500 Internal Server Error"),
        (502, "502 Bad Gateway"),
        (503, "503 Service Unavailable"),
        (504, "504 Gateway Timeout"),
        (599, "599"),
    ],
)
@pytest.mark.parametrize("phase", ["health", "models"])
def test_classify_not_ready_statuses(phase: str, status: int, label: str) -> None:
    outcome = classify(phase, status)
    assert outcome.verdict is Verdict.NOT_READY
    assert outcome.label == label


def test_classify_other_client_errors_are_config_errors_with_the_body() -> None:
    outcome = classify("models", 400, "bad request body")
    assert outcome.verdict is Verdict.CONFIG
    assert "GET /v1/models answered 400: 'bad request body'" in outcome.problem
    assert outcome.fix


def _error_of(url: str, **kwargs: Any) -> httpx.HTTPError:
    with pytest.raises(httpx.HTTPError) as info:
        httpx.get(url, **kwargs)
    return info.value


def test_classify_connection_refused_is_not_ready(refused_url: str) -> None:
    error = _error_of(f"{refused_url.removesuffix('/v1')}/health")  # a real refusal
    outcome = classify("health", None, error=error)
    assert outcome == Outcome(Verdict.NOT_READY, "connection refused")


def test_classify_timeouts_are_not_ready() -> None:
    assert classify("health", None, error=httpx.ConnectTimeout("timed out")).label == (
        "connect timed out"
    )
    read = classify("health", None, error=httpx.ReadTimeout("timed out"))
    assert read == Outcome(Verdict.NOT_READY, "timed out")


def test_classify_a_reset_connection_is_not_ready() -> None:
    outcome = classify("models", None, error=httpx.RemoteProtocolError("Server disconnected"))
    assert outcome.verdict is Verdict.NOT_READY
    assert "RemoteProtocolError" in outcome.label


def test_classify_dns_failure_is_unreachable() -> None:
    error = httpx.ConnectError("[Errno -2] Name or service not known")
    error.__cause__ = socket.gaierror(-2, "Name or service not known")
    outcome = classify("health", None, error=error)
    assert outcome.verdict is Verdict.UNREACHABLE
    assert "does not resolve" in outcome.problem
    assert outcome.fix == "check the host in the URL"
    # EAI_NONAME's sibling, EAI_NODATA (-5), too.
    other = httpx.ConnectError("no address")
    other.__cause__ = socket.gaierror(-5, "No address associated with hostname")
    assert classify("health", None, error=other).verdict is Verdict.UNREACHABLE


def test_classify_tls_errors_are_config_errors() -> None:
    cert = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    cert.__cause__ = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    outcome = classify("health", None, error=cert)
    assert outcome.verdict is Verdict.CONFIG
    assert outcome.label == "TLS certificate error"
    assert "does not verify" in outcome.problem
    assert "SSL_CERT_FILE" in outcome.fix

    handshake = httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number")
    handshake.__cause__ = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    outcome = classify("health", None, error=handshake)
    assert outcome.verdict is Verdict.CONFIG
    assert "http:// for a plain server" in outcome.fix


def test_classify_https_to_a_plain_server_is_a_tls_config_error(endpoint_server) -> None:
    server = endpoint_server()
    error = _error_of(f"https://127.0.0.1:{server.port}/health", timeout=5)
    assert classify("health", None, error=error).verdict is Verdict.CONFIG


# ---------------------------------------------------------------------------- Waker


def request(server: StubServer | str, timeout: float = 10.0, **fields: Any) -> WakeRequest:
    base = server if isinstance(server, str) else server.base_url
    return WakeRequest(
        platform=fields.pop("platform", "p"), base_url=base, timeout=timeout, **fields
    )


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    try:
        return call(), time.monotonic() - start
    except PlatformError as error:
        return error, time.monotonic() - start


def test_root_url() -> None:
    assert request("http://h:1/v1").root_url == "http://h:1"
    assert request("http://h:1/x/v1").root_url == "http://h:1/x"


def test_warm_endpoint_is_ready_at_once_and_warm(endpoint_server) -> None:
    server = endpoint_server(model="m1")
    result = Waker(request(server)).run()
    assert result == WakeResult(model="m1", seconds=result.seconds, cold=False, probes=2)
    assert result.seconds < 5


@pytest.mark.parametrize("style", ["refuse", "503", "refuse-then-503"])
def test_polling_styles_wait_through_the_cold_start(endpoint_server, style: str) -> None:
    server = endpoint_server(cold_start=1.0, cold_style=style)
    result = Waker(request(server)).run()
    assert result.cold is True
    assert result.model == "stub"
    assert 0.8 <= result.seconds < 5.0
    assert result.probes > 2  # it polled


def test_hold_style_is_waited_for_with_few_probes(endpoint_server) -> None:
    server = endpoint_server(cold_start=1.5, cold_style="hold")
    result = Waker(request(server)).run()
    assert result.cold is True
    assert 1.2 <= result.seconds < 5.0
    assert result.probes <= 3
    assert server.stats.requests.get("/health", 0) <= 2


def test_redirect_after_a_held_request_is_followed(endpoint_server) -> None:
    server = endpoint_server(cold_start=1.5, cold_style="hold", redirect_after=0.4)
    result = Waker(request(server)).run()
    assert result.cold is True
    assert result.model == "stub"
    assert server.stats.requests.get("/__result", 0) >= 1  # the 303 was followed with GET


def test_never_ready_raises_within_the_timeout(endpoint_server) -> None:
    server = endpoint_server(cold_start=3600, cold_style="503")
    waker = Waker(request(server, timeout=1.0, platform="slow"))
    error, seconds = timed(waker.run)
    assert isinstance(error, UnavailableError)
    assert 0.9 <= seconds < 2.0
    text = str(error)
    assert text.startswith("vllm platform 'slow': ")
    assert f"{server.root_url} did not become ready within 1s" in text
    assert "(last answer: 503 Service Unavailable)" in text
    assert "Fix: raise wake_timeout" in text
    assert error.exit_code == 75
    assert waker.state.failed is True


def test_hung_health_fails_at_the_deadline_not_later(endpoint_server) -> None:
    server = endpoint_server(health_hang=True)
    error, seconds = timed(Waker(request(server, timeout=1.0)).run)
    assert isinstance(error, UnavailableError)
    assert "did not become ready within 1s" in str(error)
    assert 0.9 <= seconds < 2.0


def test_refused_forever_fails_at_the_deadline(refused_url: str) -> None:
    error, seconds = timed(Waker(request(refused_url, 1.0)).run)
    assert isinstance(error, UnavailableError)
    assert "(last answer: connection refused)" in str(error)
    assert seconds < 2.0


def test_dns_failure_fails_at_once() -> None:
    error, seconds = timed(Waker(request("http://nonexistent.invalid/v1", 30.0)).run)
    assert isinstance(error, UnavailableError)
    assert "does not resolve" in str(error)
    assert "http://nonexistent.invalid" in str(error)
    assert seconds < 10  # not the 30 s timeout


def test_wrong_key_is_a_config_error_naming_the_variable(endpoint_server) -> None:
    server = endpoint_server(api_key=API_KEY)
    error, seconds = timed(Waker(request(server, api_key="sk-wrong", api_key_env="MY_KEY")).run)
    assert isinstance(error, ConfigError)
    text = str(error)
    assert f"{server.base_url}/models answered 401: the key in MY_KEY was rejected" in text
    assert "Fix: set MY_KEY to the API key the server was started with" in text
    assert "sk-wrong" not in text
    assert seconds < 5


def test_missing_key_says_which_variable_to_set(endpoint_server) -> None:
    server = endpoint_server(api_key=API_KEY)
    error = timed(Waker(request(server)).run)[0]
    assert isinstance(error, ConfigError)
    assert "no API key was sent because VLLM_API_KEY is not set" in str(error)
    assert "export VLLM_API_KEY=" in str(error)


def test_right_key_is_sent(endpoint_server) -> None:
    server = endpoint_server(api_key=API_KEY)
    assert Waker(request(server, api_key=API_KEY)).run().model == "stub"


def test_proxy_auth_missing_and_wrong(endpoint_server) -> None:
    server = endpoint_server(proxy_auth=(PROXY_KEY, PROXY_SECRET))
    missing = timed(Waker(request(server)).run)[0]
    assert isinstance(missing, ConfigError)
    assert "Modal proxy auth is required" in str(missing)
    wrong = timed(
        Waker(request(server, headers={"Modal-Key": PROXY_KEY, "Modal-Secret": "nope"})).run
    )[0]
    assert isinstance(wrong, ConfigError)
    assert "proxy auth token was rejected" in str(wrong)
    assert PROXY_SECRET not in str(wrong)
    ok = Waker(request(server, headers={"Modal-Key": PROXY_KEY, "Modal-Secret": PROXY_SECRET}))
    assert ok.run().model == "stub"


def test_model_not_served_lists_the_served_models(endpoint_server) -> None:
    server = endpoint_server(model="served-one")
    error = timed(Waker(request(server, model="wanted")).run)[0]
    assert isinstance(error, ConfigError)
    text = str(error)
    assert f"model 'wanted' is not served at {server.base_url} (it serves: served-one)" in text
    assert "Fix: set model = 'served-one' on the platform" in text


def test_model_none_picks_the_first_served(endpoint_server) -> None:
    server = endpoint_server(model="first")
    assert Waker(request(server, model=None)).run().model == "first"
    assert Waker(request(server, model="first")).run().model == "first"


def test_wrong_base_path_is_a_config_error(endpoint_server) -> None:
    server = endpoint_server()
    error = timed(Waker(request(f"{server.root_url}/wrong/v1")).run)[0]
    assert isinstance(error, ConfigError)
    assert "GET /v1/models answered 404" in str(error)
    assert f"{server.root_url}/wrong/v1" in str(error)


def test_failure_callback_stops_the_wake_at_once(endpoint_server) -> None:
    server = endpoint_server(cold_start=3600, cold_style="503")
    calls = []

    def failure() -> str | None:
        calls.append(1)
        return "exit code 1" if len(calls) >= 3 else None

    error, seconds = timed(Waker(request(server, timeout=30.0, failure=failure)).run)
    assert isinstance(error, UnavailableError)
    assert "the server process died while waking: exit code 1" in str(error)
    assert seconds < 5  # well before the 30 s timeout


def test_cancel_stops_the_wake(endpoint_server) -> None:
    server = endpoint_server(cold_start=3600, cold_style="503")
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    error, seconds = timed(Waker(request(server, timeout=30.0), cancel=cancel).run)
    assert isinstance(error, UnavailableError)
    assert "cancelled" in str(error)
    assert seconds < 5


def test_wake_state_line() -> None:
    state = WakeState("gpu", 900.0, started=100.0, last="503 Service Unavailable")
    assert state.line(now=112.34) == "gpu 12.3s/900s 503 Service Unavailable"
    state.in_flight_since = 101.0
    assert state.line(now=112.34) == "gpu 12.3s/900s request held open 11s"
    state.in_flight_since = None
    state.done = True
    assert state.line(now=112.34) == "gpu 12.3s/900s ready"


# ---------------------------------------------------------------------------- wake_all


def test_wake_all_wakes_concurrently(endpoint_server) -> None:
    servers = [
        endpoint_server(cold_start=c, cold_style="503", model=f"m{i}")
        for i, c in enumerate((0.5, 1.0, 1.5))
    ]
    seen: list[list[str]] = []
    requests = [request(s, platform=f"p{i}") for i, s in enumerate(servers)]
    results, seconds = timed(
        lambda: wake_all(
            requests, on_progress=lambda states: seen.append([s.platform for s in states])
        )
    )
    assert seconds < 1.5 + 1.0  # the longest cold start plus slack, not the sum (3 s)
    assert {name: r.model for name, r in results.items()} == {"p0": "m0", "p1": "m1", "p2": "m2"}
    assert all(isinstance(r, WakeResult) and r.cold for r in results.values())
    assert seen
    assert seen[-1] == ["p0", "p1", "p2"]


def test_wake_all_keeps_every_outcome_without_fail_fast(endpoint_server) -> None:
    good = endpoint_server()
    keyed = endpoint_server(api_key=API_KEY)
    results = wake_all([request(good, platform="good"), request(keyed, platform="keyed")])
    assert isinstance(results["good"], WakeResult)
    assert isinstance(results["keyed"], ConfigError)
    assert str(results["keyed"]).startswith("vllm platform 'keyed': ")


def test_wake_all_fail_fast_cancels_the_others(endpoint_server) -> None:
    keyed = endpoint_server(api_key=API_KEY)
    never = endpoint_server(cold_start=3600, cold_style="503")
    results, seconds = timed(
        lambda: wake_all(
            [request(keyed, platform="keyed"), request(never, timeout=30.0, platform="never")],
            fail_fast=True,
        )
    )
    assert seconds < 5
    assert isinstance(results["keyed"], ConfigError)
    assert isinstance(results["never"], UnavailableError)
    assert "cancelled" in str(results["never"])
