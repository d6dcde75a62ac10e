"""pytest hooks and fixtures of pytest-modal-vllm (registered as the `modal_vllm` plugin).

Only hooks and fixtures live here; each delegates to the module that owns the concern.
Nothing heavy is imported at module level: with no platform selected, the plugin costs an
import of this module, `settings` and `platforms`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from . import settings as settings_module
from .errors import ConfigError, PlatformError
from .runtime import CLIENT_FIXTURES, WORKERINPUT_KEY, WORKEROUTPUT_KEY, Runtime

if TYPE_CHECKING:
    import openai
    from langchain_openai import ChatOpenAI

    from .endpoint import Endpoint

RUNTIME = pytest.StashKey[Runtime]()


def _runtime(config: pytest.Config) -> Runtime:
    return config.stash[RUNTIME]


# ---------------------------------------------------------------------------- hooks


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the --vllm-* options and vllm_* ini keys."""
    settings_module.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """`--vllm-list-platforms`: print every known platform and exit 0."""
    if not config.getoption("vllm_list_platforms"):
        return None
    from .platforms import load_platforms
    from .reporting import platform_table

    try:
        settings = settings_module.from_pytest(config)
        known = load_platforms(settings.rootdir, settings["config"])
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    for line in platform_table(known):
        print(line)
    return 0


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers and resolve the settings (bad values: exit 4)."""
    config.addinivalue_line(
        "markers", "vllm_platforms(*names): run only on these LLM platforms, skip elsewhere"
    )
    config.addinivalue_line(
        "markers",
        "vllm_requires(*capabilities): skip on LLM platforms that lack a capability "
        "(tools, json_schema, streaming, ...)",
    )
    try:
        settings = settings_module.from_pytest(config)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    runtime = Runtime(settings=settings, is_worker=hasattr(config, "workerinput"))
    config.stash[RUNTIME] = runtime
    if runtime.is_worker:
        runtime.load_workerinput(config.workerinput[WORKERINPUT_KEY])  # type: ignore[attr-defined]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before collection: resolve, start and wake the selected platforms (controller only)."""
    config = session.config
    runtime = _runtime(config)
    if runtime.is_worker or not runtime.selected:
        return
    from .platforms import select
    from .reporting import WakeProgress
    from .session import EndpointSession

    settings = runtime.settings
    skip = settings["unavailable"] == "skip"
    try:
        platforms = select(runtime.known(), runtime.selected)
        runtime.capabilities = {p.name: tuple(p.capabilities) for p in platforms}
        if config.option.collectonly:
            return  # collection needs names and capabilities only: nothing is started
        settings_module.apply_env_file(settings.env_file_values)
        runtime.session = EndpointSession(platforms, settings)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    progress = None
    if reporter is not None:
        tty = reporter.isatty() if callable(reporter.isatty) else reporter.isatty
        progress = WakeProgress(
            reporter.write_line, (lambda line: reporter.rewrite(line, erase=True)) if tty else None
        )
    import httpx  # noqa: F401  (before the pre-import thread: the wake needs it first)

    if not getattr(config.option, "numprocesses", None):
        # xdist workers import their own clients; without xdist, import them during the wait.
        from .clients import prewarm_imports

        prewarm_imports()
    try:
        runtime.session.start(fail_fast=not skip, on_progress=progress)
    except PlatformError as error:
        if progress is not None:
            progress.finish()
        runtime.session.close()
        if isinstance(error, ConfigError):
            raise pytest.UsageError(str(error)) from None
        pytest.exit(str(error), returncode=error.exit_code)
    if progress is not None:
        progress.finish()
    runtime.endpoints = runtime.session.endpoints
    runtime.unavailable = {name: str(err) for name, err in runtime.session.errors.items()}


def pytest_report_header(config: pytest.Config) -> list[str]:
    """One line per woken platform, plus where each effective setting came from."""
    runtime = _runtime(config)
    if not runtime.selected:
        return []
    from .reporting import header_line, settings_line

    lines = [
        header_line(runtime.endpoints[name])
        for name in runtime.selected
        if name in runtime.endpoints
    ]
    lines += [
        f"vllm: {name} unavailable, its tests are skipped"
        for name in runtime.selected
        if name in runtime.unavailable
    ]
    if runtime.session is not None:
        for run in runtime.session.runs:
            lines.append(
                settings_line(
                    run.name,
                    {
                        "wake_timeout": (run.wake_timeout, run.wake_timeout_source),
                        "keep_alive": (run.keep_alive, run.keep_alive_source),
                        "unavailable": (
                            runtime.settings["unavailable"],
                            runtime.settings.sources["unavailable"],
                        ),
                    },
                )
            )
    return lines


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: hand the woken endpoints to each worker."""
    node.workerinput[WORKERINPUT_KEY] = _runtime(node.config).to_workerinput()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist: merge a finished worker's usage counters."""
    usage = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
    if usage:
        _runtime(node.config).meter.merge(usage)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """With several platforms selected, run each LLM test once per platform."""
    runtime = _runtime(metafunc.config)
    if len(runtime.selected) > 1 and "vllm_platform" in metafunc.fixturenames:
        metafunc.parametrize(
            "vllm_platform", runtime.selected, indirect=True, scope="session", ids=runtime.selected
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip LLM tests without a platform, on other platforms, or lacking a capability."""
    runtime = _runtime(config)
    for item in items:
        reason = runtime.skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Workers hand their usage to the controller; the controller writes the reports."""
    config = session.config
    runtime = _runtime(config)
    if runtime.is_worker:
        config.workeroutput[WORKEROUTPUT_KEY] = runtime.meter.snapshot()  # type: ignore[attr-defined]
        return
    if not runtime.selected or config.option.collectonly:
        return
    from .usage import markdown, report_rows, write_json

    rows = report_rows(runtime.report_platforms(), runtime.meter, runtime.keep_alive_pings())
    if runtime.settings["report"]:
        write_json(runtime.settings["report"], rows)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(markdown(rows))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The `vllm usage` section: requests, tokens, latency, wake and pings per platform."""
    runtime = _runtime(config)
    if runtime.is_worker or not runtime.selected or config.option.collectonly:
        return
    from .usage import report_rows, table_lines

    rows = report_rows(runtime.report_platforms(), runtime.meter, runtime.keep_alive_pings())
    terminalreporter.write_sep("=", "vllm usage")
    for line in table_lines(rows):
        terminalreporter.write_line(line)
    if runtime.settings["report"]:
        terminalreporter.write_line(f"vllm report written to {runtime.settings['report']}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop everything the plugin started (also after a failure or Ctrl-C)."""
    runtime = config.stash.get(RUNTIME, None)
    if runtime is None:
        return
    for factory in runtime.factories.values():
        factory.close()
    if runtime.session is not None:
        for problem in runtime.session.close():
            print(f"vllm: {problem}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail at once, with the cause, a test whose platform stayed dead through a re-wake."""
    runtime = _runtime(item.config)
    if not runtime.factories or not set(getattr(item, "fixturenames", ())) & CLIENT_FIXTURES:
        return
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("vllm_platform") if callspec is not None else None
    names = [name] if name else runtime.selected
    for platform in names:
        factory = runtime.factories.get(platform)
        if factory is not None and factory.guard.dead:
            pytest.fail(f"LLM platform {platform!r} is down: {factory.guard.dead}", pytrace=False)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vllm_platform(request: pytest.FixtureRequest) -> str:
    """The name of the LLM platform this test runs against (`--vllm-platform`).

    With several platforms selected, every test that uses an LLM fixture runs once per
    platform and its id carries the name (`test_x[stub]`). Without a platform, such tests are
    skipped.
    """
    runtime = _runtime(request.config)
    if hasattr(request, "param"):
        return str(request.param)
    if not runtime.selected:
        pytest.skip(runtime.no_platform_reason())
    return runtime.selected[0]


@pytest.fixture(scope="session")
def vllm_endpoint(vllm_platform: str, request: pytest.FixtureRequest) -> Endpoint:
    """The woken endpoint of the platform: base URL, model, key (masked in repr), headers.

    A `pytest_modal_vllm.Endpoint` with `platform`, `base_url` (ends in `/v1`), `model`,
    `api_key`, `headers`, `wake_seconds` and `cold`.
    """
    runtime = _runtime(request.config)
    if vllm_platform in runtime.unavailable:
        pytest.skip(runtime.unavailable[vllm_platform])
    if vllm_platform not in runtime.endpoints:
        pytest.skip(f"LLM platform {vllm_platform!r} was not started in this run (--collect-only?)")
    return runtime.endpoints[vllm_platform]


@pytest.fixture(scope="session")
def openai_client(vllm_endpoint: Endpoint, request: pytest.FixtureRequest) -> openai.OpenAI:
    """An `openai.OpenAI` client bound to the woken endpoint (session-scoped).

    Requests are metered for the `vllm usage` report and wait through a mid-session cold start.
    """
    return _runtime(request.config).factory(vllm_endpoint.platform).openai_client()


@pytest.fixture
def async_openai_client(
    vllm_endpoint: Endpoint, request: pytest.FixtureRequest
) -> openai.AsyncOpenAI:
    """An `openai.AsyncOpenAI` client bound to the woken endpoint (one per test).

    Made fresh for each test so that it works in whatever event loop the test runs
    (pytest-asyncio, anyio or `asyncio.run`).
    """
    # Not closed at teardown: the test's event loop may already be gone; its connections
    # belong to that loop and go with it.
    return _runtime(request.config).factory(vllm_endpoint.platform).async_openai_client()


@pytest.fixture
def chat_model(
    vllm_endpoint: Endpoint, chat_model_factory: Callable[..., ChatOpenAI]
) -> ChatOpenAI:
    """A LangChain `ChatOpenAI` bound to the woken endpoint (one per test).

    `temperature=0`, `stream_usage=True` and the platform's client defaults; use
    `chat_model_factory(**overrides)` for other settings.
    """
    return chat_model_factory()


@pytest.fixture(scope="session")
def chat_model_factory(
    vllm_endpoint: Endpoint, request: pytest.FixtureRequest
) -> Callable[..., ChatOpenAI]:
    """A factory `factory(**overrides) -> ChatOpenAI` bound to the woken endpoint.

    Overrides are `ChatOpenAI` arguments (`temperature`, `max_tokens`, `model_kwargs`, ...).
    """
    factory = _runtime(request.config).factory(vllm_endpoint.platform)
    return factory.chat_model
