"""`--vllm-export-env`: the selected platform in the OpenAI variables, for code that builds its
own clients (`OpenAI()`, `ChatOpenAI()`, LangChain's standard suites, third-party helpers).

The controller sets them in `pytest_sessionstart`, right after the wake and before xdist starts
its workers at the end of that same hook (pytest-xdist's `DSession.pytest_sessionstart` is
`trylast`), so every worker process inherits them; they are put back as they were in
`pytest_unconfigure`. The key is never shown: the header line prints `OPENAI_API_KEY=***`.

With several platforms selected, one set of variables cannot be right for tests that run on the
others: the run stops with exit 4 before anything is started (see `check`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import pytest

    from .endpoint import Endpoint
    from .settings import Settings

#: What is exported. `OPENAI_API_BASE` too, because LangChain's `ChatOpenAI` reads it before
#: `OPENAI_BASE_URL`: a stale one in the shell would otherwise win.
BASE_URL_VARIABLES = ("OPENAI_BASE_URL", "OPENAI_API_BASE")
KEY_VARIABLE = "OPENAI_API_KEY"
MODEL_VARIABLE = "OPENAI_MODEL"
#: The key exported when the platform's key variable is unset: openai insists on one, the server
#: (vLLM without `--api-key`) accepts any, and a real OpenAI key in the shell never reaches it.
NO_KEY = "no-key-set"


def check(settings: Settings) -> None:
    """Exit 4 (ConfigError) when the export is on with several platforms selected."""
    selected = settings.platforms
    if not settings["export_env"] or len(selected) <= 1:
        return
    source = settings.sources["export_env"]
    raise ConfigError(
        f"the export of the endpoint to OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL is on "
        f"({source}), but {len(selected)} platforms are selected ({', '.join(selected)}): "
        "one set of variables cannot serve tests that run on each of them, and code that "
        "builds its own client would silently talk to one platform in the tests of another",
        "select one platform per run (a CI matrix does that), or leave the export off "
        "(MODAL_VLLM_EXPORT_ENV=0) and give such code pytest_modal_vllm.current_endpoint(), "
        "which follows the platform of the running test",
    )


def variables(endpoint: Endpoint) -> dict[str, str]:
    """The variables exported for `endpoint` (the key included)."""
    values = {name: endpoint.base_url for name in BASE_URL_VARIABLES}
    values[KEY_VARIABLE] = endpoint.api_key or NO_KEY
    values[MODEL_VARIABLE] = endpoint.model
    return values


class EnvExport:
    """The exported variables of one session; a plugin object that puts them back at the end
    and shows them (key masked) in the report header."""

    def __init__(
        self, endpoint: Endpoint, source: str, environ: MutableMapping[str, str] | None = None
    ) -> None:
        self.endpoint = endpoint
        self.source = source
        self.environ: MutableMapping[str, str] = os.environ if environ is None else environ
        self.previous: dict[str, str | None] = {}

    def apply(self) -> None:
        """Set the variables, remembering what they were."""
        for name, value in variables(self.endpoint).items():
            self.previous.setdefault(name, self.environ.get(name))
            self.environ[name] = value

    def restore(self) -> None:
        """Put every variable back as it was (unset if it was unset). Idempotent."""
        for name, value in self.previous.items():
            if value is None:
                self.environ.pop(name, None)
            else:
                self.environ[name] = value
        self.previous.clear()

    def header_line(self) -> str:
        """`vllm: exported OPENAI_BASE_URL=... OPENAI_API_KEY=*** ...` (never the key)."""
        endpoint = self.endpoint
        key = "***" if endpoint.api_key else f"{NO_KEY} (no key set for {endpoint.platform})"
        line = (
            f"vllm: {endpoint.platform} exported for code that builds its own clients "
            f"({self.source}): OPENAI_BASE_URL={endpoint.base_url} (and OPENAI_API_BASE) "
            f"OPENAI_API_KEY={key} OPENAI_MODEL={endpoint.model}"
        )
        if endpoint.headers:
            line += (
                "; the proxy-auth headers cannot travel in variables: such clients need "
                "default_headers=current_endpoint().headers"
            )
        return line

    # ------------------------------------------------------------------ hooks

    def pytest_report_header(self) -> list[str]:
        """The exported variables, key masked."""
        return [self.header_line()]

    def pytest_unconfigure(self) -> None:
        """Put the variables back."""
        self.restore()


def export(config: pytest.Config, settings: Settings, ready: Mapping[str, Endpoint]) -> None:
    """In the controller, after the wake: export the one selected platform if asked to.

    Nothing is exported when the export is off, or when the platform could not be woken
    (`--vllm-unavailable=skip`: its tests are skipped anyway).
    """
    if not settings["export_env"] or len(settings.platforms) != 1:
        return
    endpoint = ready.get(settings.platforms[0])
    if endpoint is None:
        return
    exported = EnvExport(endpoint, settings.sources["export_env"])
    exported.apply()
    config.pluginmanager.register(exported, "modal_vllm_export")
