"""pytest hooks and fixtures of pytest-modal-vllm (registered as the `modal_vllm` plugin).

Only hooks and fixtures live here; each delegates to the module that owns the concern.
Nothing heavy is imported at module level: with no platform selected, the plugin costs an
import of this module, `settings` and `platforms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from . import settings as settings_module
from .errors import ConfigError
from .runtime import CLIENT_FIXTURES, LLM_FIXTURES, Runtime

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
    """`--vllm-list-platforms`: print every known platform and exit 0.

    First, exit 4 when a value of ours written after a space moved pytest's rootdir or ini file.
    """
    from .rootdir_trap import find_trap

    trap = find_trap(config)
    if trap is not None:
        raise pytest.UsageError(str(trap))
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
    """Register the markers, resolve the settings (bad values: exit 4) and this process's role."""
    config.addinivalue_line(
        "markers", "vllm_platforms(*names): run only on these LLM platforms, skip elsewhere"
    )
    config.addinivalue_line(
        "markers",
        "vllm_requires(*capabilities): skip on LLM platforms that lack a capability "
        "(tools, json_schema, streaming, ...)",
    )
    if config.option.help:
        return  # `--help` works whatever the environment holds (a real run still checks it)
    try:
        settings = settings_module.from_pytest(config)
    except ConfigError as error:
        raise pytest.UsageError(str(error)) from None
    runtime = config.stash[RUNTIME] = Runtime(settings=settings)
    from .current import activate
    from .roles import Controller, Worker

    activate(config, runtime)  # for current_endpoint(), outside fixtures

    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        config.pluginmanager.register(Worker(runtime, workerinput), "modal_vllm_worker")
    elif runtime.selected and not config.option.collectonly:
        # Collection needs names and capabilities only: nothing is started without tests.
        config.pluginmanager.register(Controller(runtime), "modal_vllm_controller")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """With several platforms selected, run each LLM test once per platform."""
    runtime = _runtime(metafunc.config)
    if len(runtime.selected) > 1 and "vllm_platform" in metafunc.fixturenames:
        metafunc.parametrize(
            "vllm_platform", runtime.selected, indirect=True, scope="session", ids=runtime.selected
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip LLM tests without a platform, on other platforms, or lacking a capability; with
    `--record-mode`, give LLM tests pytest-recording's `vcr` marker."""
    runtime = _runtime(config)
    for item in items:
        reason = runtime.skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
    from .recording import mark, record_mode

    if record_mode(config):
        mark(items, LLM_FIXTURES)


@pytest.hookimpl(optionalhook=True)
def pytest_recording_configure(config: pytest.Config, vcr: Any) -> None:
    """pytest-recording: the cassette defaults LLM traffic needs (secrets filtered, matching
    on method, path and JSON body, the plugin's probes left out)."""
    from .recording import configure_vcr

    runtime = config.stash.get(RUNTIME, None)
    ready = runtime.ready.values() if runtime is not None else ()
    configure_vcr(vcr, {name for platform in ready for name in platform.endpoint.headers})


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """While recording, keep the endpoint a test talked to beside its cassettes."""
    from .recording import record_mode, remember

    runtime = _runtime(item.config)
    cassettes = getattr(item, "funcargs", {}).get("vcr_cassette_dir")
    uses_llm = set(getattr(item, "fixturenames", ())) & LLM_FIXTURES
    if not uses_llm or cassettes is None or record_mode(item.config) in (None, "none"):
        return
    for platform in runtime.platforms_of(item):
        if platform in runtime.ready and (cassettes, platform) not in runtime.remembered:
            runtime.remembered.add((cassettes, platform))
            remember(cassettes, runtime.ready[platform].endpoint)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop everything the plugin started (also after a failure or Ctrl-C)."""
    runtime = config.stash.get(RUNTIME, None)
    if runtime is None:
        return
    from .current import deactivate

    deactivate(config)
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
    for platform in runtime.platforms_of(item):
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
    if vllm_platform not in runtime.ready:
        pytest.skip(f"LLM platform {vllm_platform!r} was not started in this run (--collect-only?)")
    return runtime.ready[vllm_platform].endpoint


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
