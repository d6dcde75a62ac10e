"""`current_endpoint()`: the woken endpoint of this pytest run, for code outside fixtures.

LangChain's standard suites build models from a class property, helper libraries build their
own `OpenAI()`: neither can ask for a fixture. They call `current_endpoint()` instead. It works
wherever the run's platforms are known: in the controller after the wake (collection, tests),
and in xdist workers (which receive the endpoints from the controller), during collection and
tests alike.

Which endpoint: the one named, else the only platform selected, else, with several selected,
the platform of the test that is running (its `[NAME]` parameter). Inside a running test, a
run without a platform, or a platform that could not be woken (`--vllm-unavailable=skip`),
skips the test with the same reason as the fixtures; every other misuse raises
`EndpointLookupError` (a `LookupError`) with the fix.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from .endpoint import Endpoint
    from .runtime import Runtime


class EndpointLookupError(LookupError):
    """`current_endpoint()` cannot tell which endpoint is meant, or none is running."""


class _Run:
    """One pytest run of this process: its runtime, and the test that is running."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.item: pytest.Item | None = None


# Runs stack up: a pytester run inside a test run is the current one until it ends.
_RUNS: list[_Run] = []
_PLUGIN_NAME = "modal_vllm_current"


def _tracker(run: _Run) -> object:
    """The plugin object that tells `run` which test is running (from setup to teardown).

    Built here so that importing this module (the package does) does not import pytest:
    `modal-vllm` does not need it.
    """
    import pytest

    class RunningTest:
        def __init__(self) -> None:
            self.run = run

        @pytest.hookimpl(wrapper=True, tryfirst=True)
        def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, Any, Any]:
            run.item = item
            try:
                return (yield)
            finally:
                run.item = None

    return RunningTest()


def activate(config: pytest.Config, runtime: Runtime) -> None:
    """Make `runtime` the current run of this process (from `pytest_configure`)."""
    run = _Run(runtime)
    _RUNS.append(run)
    config.pluginmanager.register(_tracker(run), _PLUGIN_NAME)


def deactivate(config: pytest.Config) -> None:
    """End the current run (from `pytest_unconfigure`)."""
    tracker = config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if tracker is None:
        return
    config.pluginmanager.unregister(tracker)
    if tracker.run in _RUNS:
        _RUNS.remove(tracker.run)


def current_runtime() -> Runtime:
    """The runtime of the pytest run in this process (EndpointLookupError outside one)."""
    if not _RUNS:
        raise EndpointLookupError(
            "vllm: no pytest run with pytest-modal-vllm is active in this process. Fix: call "
            "current_endpoint() from a test, a fixture or code they run (under pytest)"
        )
    return _RUNS[-1].runtime


def current_platform(name: str | None = None) -> str:
    """The platform meant by `current_endpoint(name)` (see the module docstring)."""
    from .runtime import parametrized_platform

    runtime = current_runtime()  # raises outside a run: from here on `_RUNS` holds one
    run = _RUNS[-1]
    in_test = run.item is not None
    selected = runtime.selected
    if not selected:
        reason = runtime.no_platform_reason()
        if in_test:
            _skip(reason)
        raise EndpointLookupError(f"vllm: {reason}")
    if name is None:
        name = parametrized_platform(run.item)
    if name is None:
        if len(selected) > 1:
            raise EndpointLookupError(
                f"vllm: {len(selected)} platforms are selected ({', '.join(selected)}) and "
                "current_endpoint() was called outside a test that runs on one of them. Fix: "
                f"name it, current_endpoint({selected[0]!r}), or call it from a test that uses "
                "an LLM fixture (its [NAME] parameter tells the platform)"
            )
        name = selected[0]
    if name not in selected:
        raise EndpointLookupError(
            f"vllm: platform {name!r} is not selected in this run (selected: "
            f"{', '.join(selected)}). Fix: pass --vllm-platform={name}, or ask for one of those"
        )
    if name in runtime.unavailable:
        if in_test:
            _skip(runtime.unavailable[name])
        raise EndpointLookupError(runtime.unavailable[name])
    if name not in runtime.ready:
        raise EndpointLookupError(
            f"vllm: platform {name!r} was not started in this run (--collect-only?). Fix: ask "
            "for the endpoint while tests run, not while collecting with --collect-only"
        )
    return name


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)


def current_endpoint(name: str | None = None) -> Endpoint:
    """The woken endpoint of platform `name`, or of the platform this code runs against.

    For code that cannot take a fixture (a class property, a helper that builds its own
    client). With `name=None`: the only selected platform, or, with several, the one of the
    running test. Inside a test, no platform or an unavailable one skips the test (as the
    fixtures do); other misuse raises `EndpointLookupError`.
    """
    return current_runtime().ready[current_platform(name)].endpoint


def chat_model_kwargs(name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The `ChatOpenAI(**kwargs)` of the plugin's `chat_model` for that platform: base URL,
    model, key, the platform's client defaults, and the metered HTTP clients that wait through a
    cold start. `overrides` win."""
    runtime = current_runtime()
    return runtime.factory(current_platform(name)).chat_model_kwargs(**overrides)


def current_capabilities(name: str | None = None) -> tuple[str, ...]:
    """The `capabilities` of that platform (as declared in its definition)."""
    runtime = current_runtime()
    return runtime.capabilities.get(current_platform(name), ())
