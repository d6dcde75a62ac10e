"""One resolution step per platform per session: the frozen, fully resolved platform.

Everything downstream (providers, wake, keep-alive, clients, reports and the `modal-vllm`
command) reads a `ResolvedPlatform`; nothing else expands `${VAR}`, applies a kind default or
decides precedence. Precedence of the per-platform settings, highest first (the first three
levels are resolved once for the run by `settings.resolve`):

    command line > environment (MODAL_VLLM_*) > ini > platform field > kind default
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import ConfigError
from .modal_sdk import DEFAULT_FUNCTION, ModalTarget, bundled_app_file
from .platforms import Platform, check_base_url, normalize_base_url
from .settings import TRUE_WORDS, Settings

T = TypeVar("T")

DEFAULT_WAKE_TIMEOUT = {"modal": 900.0, "url": 600.0, "process": 300.0, "stub": 30.0}
DEFAULT_KEEP_ALIVE = {"modal": "ping", "url": "off", "process": "off", "stub": "off"}
# The bundled app's endpoint in snapshot mode: an `@app.server` class named `serve`.
SNAPSHOT_SERVER = "serve"
PROXY_TOKEN_ID_ENV = "MODAL_PROXY_TOKEN_ID"
PROXY_TOKEN_SECRET_ENV = "MODAL_PROXY_TOKEN_SECRET"


@dataclass(frozen=True)
class Setting(Generic[T]):
    """An effective value and where it came from (`command line`, `platform NAME`, ...)."""

    value: T
    source: str


@dataclass(frozen=True)
class ClientOptions:
    """The defaults of every client built for a platform (its `client` table over these)."""

    timeout: float = 300.0
    max_retries: int = 3
    temperature: float = 0.0
    max_tokens: int | None = None
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> ClientOptions:
        """The platform's `client` table (validated by `platforms.validate`) over the defaults."""
        values = dict(table)
        for name, kind in (("timeout", float), ("max_retries", int), ("temperature", float)):
            if name in values:
                values[name] = kind(values[name])
        return cls(**values)


@dataclass(frozen=True)
class ResolvedPlatform:
    """One selected platform with every value final: variables expanded, defaults applied.

    Kind-specific values are empty for other kinds: `base_url` (url), `command` and `env`
    (process; `{model}` already filled in, `{port}` and `{host}` left for the provider),
    `script` (stub), `modal`, `modal_app`, `deploy_env` and `modal_mode` (modal).
    """

    definition: Platform = field(repr=False)
    model: str | None
    wake_timeout: Setting[float]
    keep_alive: Setting[str]
    client: ClientOptions
    api_key: str | None = field(default=None, repr=False)
    # Extra headers of every request (Modal proxy auth): secrets, never shown.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    base_url: str | None = None
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    script: Path | None = None
    modal: ModalTarget | None = None
    modal_app: Path | None = None
    deploy_env: Mapping[str, str] = field(default_factory=dict)
    # "locate" (the deployed app), "deploy" (deploy first) or "ephemeral" (run for the session).
    modal_mode: str = "locate"
    # How the bundled app starts: "snapshot" (SNAPSHOT on) or "plain"; None outside modal.
    app_mode: Setting[str] | None = None

    @property
    def name(self) -> str:
        """The platform name."""
        return self.definition.name

    @property
    def kind(self) -> str:
        """The platform kind."""
        return self.definition.kind

    @property
    def api_key_env(self) -> str:
        """The variable the API key comes from (named in messages, never its value)."""
        return self.definition.api_key_env

    @property
    def keep_alive_interval(self) -> float:
        """Seconds between keep-alive pings."""
        return self.definition.keep_alive_interval

    @property
    def preflight(self) -> Callable[[], None] | None:
        """A check run before a built-in process starts, if any."""
        return self.definition.preflight


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(platform: str, field_name: str, value: str, env: Mapping[str, str] | None = None) -> str:
    """Replace `${VAR}` (and `${VAR:-default}`) from the environment, or raise `ConfigError`."""
    environ = os.environ if env is None else env

    def substitute(match: re.Match[str]) -> str:
        var, default = match.group(1), match.group(2)
        # As in the shell, `${VAR:-default}` also uses the default when VAR is set but empty.
        if var in environ and (environ[var] or default is None):
            return environ[var]
        if default is not None:
            return default
        raise ConfigError(
            f"field {field_name!r} uses ${{{var}}}, but {var} is not set",
            f"export {var}=... or put it in .env",
            platform=platform,
        )

    return _VAR.sub(substitute, value)


def _setting(
    settings: Settings, dest: str, own: T | None, default: T, platform: Platform
) -> Setting[T]:
    """The run-wide value (CLI/env/ini) if given, else the platform's field, else the default."""
    if settings[dest] is not None:
        return Setting(settings[dest], settings.sources[dest])
    if own is not None:
        return Setting(own, f"platform {platform.name}")
    return Setting(default, f"{platform.kind} default")


def resolve_platform(
    platform: Platform,
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    *,
    contact: bool = True,
) -> ResolvedPlatform:
    """Resolve one platform for this run, or raise `ConfigError` naming what is wrong.

    `contact=False` is for commands that never send a request to the endpoint (deploy, stop):
    credentials the requests would need (proxy tokens) are then not required.
    """
    env = os.environ if environ is None else environ
    name = platform.name

    def expanded(field_name: str, value: str) -> str:
        return expand(name, field_name, value, env)

    kind = platform.kind
    wake_timeout = _setting(
        settings, "wake_timeout", platform.wake_timeout, DEFAULT_WAKE_TIMEOUT[kind], platform
    )
    keep_alive = _setting(
        settings, "keep_alive", platform.keep_alive, DEFAULT_KEEP_ALIVE[kind], platform
    )
    if keep_alive.value == "autoscaler" and platform.kind != "modal":
        raise ConfigError(
            f"keep-alive 'autoscaler' ({keep_alive.source}) needs a modal platform, "
            f"this one is {platform.kind!r}",
            "use --vllm-keep-alive=ping or off for it",
            platform=name,
        )
    values: dict[str, Any] = {
        "definition": platform,
        "model": expanded("model", platform.model) or None if platform.model else None,
        "wake_timeout": Setting(float(wake_timeout.value), wake_timeout.source),
        "keep_alive": keep_alive,
        "client": ClientOptions.from_table(platform.client),
        "api_key": env.get(platform.api_key_env) or None,
    }
    kind_values = {
        "url": _url_values,
        "process": _process_values,
        "stub": _stub_values,
        "modal": _modal_values,
    }[platform.kind]
    values.update(kind_values(platform, values["model"], settings, env))
    if platform.kind == "modal" and contact:
        values["headers"] = proxy_headers(platform, env)
    return ResolvedPlatform(**values)


def _url_values(
    platform: Platform, model: str | None, settings: Settings, env: Mapping[str, str]
) -> dict[str, Any]:
    assert platform.base_url is not None  # required by platforms.validate
    url = expand(platform.name, "base_url", platform.base_url, env).strip()
    if not url:
        raise ConfigError(
            f"base_url {platform.base_url!r} expands to an empty string",
            "set the variable it names to the endpoint's URL (e.g. in .env)",
            platform=platform.name,
        )
    check_base_url(platform.name, url, "after expanding ${...}")
    return {"base_url": normalize_base_url(url)}


def _process_values(
    platform: Platform, model: str | None, settings: Settings, env: Mapping[str, str]
) -> dict[str, Any]:
    if not model and any("{model}" in arg for arg in platform.command):
        raise ConfigError(
            "the command uses {model} but the platform has no model",
            "set model = '...' on the platform",
            platform=platform.name,
        )
    # str.replace, not str.format: commands may carry JSON with braces of their own.
    command = tuple(arg.replace("{model}", model or "") for arg in platform.command)
    variables = {k: expand(platform.name, f"env.{k}", v, env) for k, v in platform.env.items()}
    return {"command": command, "env": variables}


def _stub_values(
    platform: Platform, model: str | None, settings: Settings, env: Mapping[str, str]
) -> dict[str, Any]:
    return {"script": platform.resolve_path(platform.script) if platform.script else None}


def _modal_values(
    platform: Platform, model: str | None, settings: Settings, env: Mapping[str, str]
) -> dict[str, Any]:
    assert platform.app is not None  # required by platforms.validate
    if settings["deploy"] and settings["ephemeral"]:
        raise ConfigError(
            "--vllm-deploy and --vllm-ephemeral were both given",
            "pick one: deploy the app for good, or run it for this session only",
            platform=platform.name,
        )
    mode = "deploy" if settings["deploy"] else "ephemeral" if settings["ephemeral"] else "locate"
    server = platform.server
    if platform.snapshot and not (platform.function or server):
        server = SNAPSHOT_SERVER  # the bundled app serves snapshots from an @app.server class
    target = ModalTarget(
        app=platform.app,
        function=None if server else platform.function or DEFAULT_FUNCTION,
        server=server,
        environment=platform.environment,
    )
    if platform.modal_app:
        app_file = Path(platform.modal_app).expanduser()
        app_file = app_file if app_file.is_absolute() else Path.cwd() / app_file
    else:
        app_file = bundled_app_file()
    deploy_env = {**_switches(platform), **platform.deploy_env, "APP_NAME": platform.app}
    snapshot = deploy_env.get("SNAPSHOT", "").strip().lower() in TRUE_WORDS
    app_mode = Setting(
        "snapshot" if snapshot else "plain",
        f"platform {platform.name}" if "SNAPSHOT" in deploy_env else "app default",
    )
    return {
        "modal": target,
        "modal_app": app_file,
        "app_mode": app_mode,
        # The deployed name, the name looked up and the name the app file gives itself agree.
        "deploy_env": deploy_env,
        "modal_mode": mode,
    }


def _switches(platform: Platform) -> dict[str, str]:
    """The app settings that platform fields switch on (the platform's `deploy_env` wins): a
    platform that sends proxy credentials deploys an app that demands them."""
    switches = {}
    if platform.proxy_auth:
        switches["PROXY_AUTH"] = "1"
    if platform.snapshot:
        switches["SNAPSHOT"] = "1"
    if platform.thinking is not None:
        switches["THINKING"] = "on" if platform.thinking else "off"
    return switches


def proxy_headers(platform: Platform, env: Mapping[str, str]) -> dict[str, str]:
    """`Modal-Key`/`Modal-Secret` for a `proxy_auth` platform ({} otherwise), or `ConfigError`."""
    if not platform.proxy_auth:
        return {}
    token_id = env.get(PROXY_TOKEN_ID_ENV, "")
    token_secret = env.get(PROXY_TOKEN_SECRET_ENV, "")
    missing = [
        name
        for name, value in ((PROXY_TOKEN_ID_ENV, token_id), (PROXY_TOKEN_SECRET_ENV, token_secret))
        if not value
    ]
    if missing:
        raise ConfigError(
            f"proxy_auth is on, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'}"
            " not set",
            f"create a proxy auth token in the Modal dashboard and export {PROXY_TOKEN_ID_ENV} "
            f"and {PROXY_TOKEN_SECRET_ENV} (or put them in .env)",
            platform=platform.name,
        )
    return {"Modal-Key": token_id, "Modal-Secret": token_secret}


def resolve_platforms(platforms: Sequence[Platform], settings: Settings) -> list[ResolvedPlatform]:
    """Resolve every selected platform, in order."""
    return [resolve_platform(platform, settings) for platform in platforms]
