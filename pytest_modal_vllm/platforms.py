"""Platforms: the named recipes for one OpenAI-compatible endpoint.

Sources, a later one replacing an earlier definition of the same name:
1. the built-ins below;
2. `[tool.modal-vllm.platforms.NAME]` tables in the rootdir's `pyproject.toml`;
3. the `--vllm-config` TOML file, with `[platforms.NAME]` tables.

Every field is validated here, when the file is read: an unknown field names the closest valid
one, a field of another kind names the kinds it belongs to, a wrong type names the expected one.
`${VAR}` references are expanded later, by `resolution.resolve_platform`, only for the
platforms a run selects, so that an unset variable of an unused platform is not an error.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

KINDS = ("modal", "url", "process", "stub")
KEEP_ALIVE_MODES = ("ping", "autoscaler", "off")
CLIENT_OPTIONS = ("timeout", "max_retries", "temperature", "max_tokens", "extra_body")

_STR = ("a string", str)
_NUM = ("a number", (int, float))
_BOOL = ("true or false", bool)
_TABLE_OF_STRINGS = ("a table of strings", dict)
_LIST_OF_STRINGS = ("a list of strings", list)


def _field(default: Any, kinds: tuple[str, ...] = KINDS, toml: tuple[str, Any] = _STR) -> Any:
    """A platform field with its schema: the kinds it belongs to and its TOML type."""
    schema = {"kinds": kinds, "toml": toml}
    if isinstance(default, (dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=schema)
    return field(default=default, metadata=schema)


@dataclass(frozen=True)
class Platform:
    """One platform definition, as written (validated, `${VAR}` not yet expanded).

    The schema lives beside each field: the kinds it applies to and the TOML type it takes
    (`FIELD_KINDS` and validation are derived from it). `None` means "the kind's default",
    applied by `resolution.resolve_platform`.
    """

    name: str
    kind: str
    source: str = "built-in"
    model: str | None = _field(None)
    api_key_env: str = _field("VLLM_API_KEY")
    base_url: str | None = _field(None, ("url",))
    app: str | None = _field(None, ("modal",))
    function: str | None = _field(None, ("modal",))
    server: str | None = _field(None, ("modal",))
    environment: str | None = _field(None, ("modal",))
    modal_app: str | None = _field(None, ("modal",))
    deploy_env: Mapping[str, str] = _field({}, ("modal",), _TABLE_OF_STRINGS)
    proxy_auth: bool = _field(False, ("modal",), _BOOL)
    fast_scaledown: bool = _field(True, ("modal",), _BOOL)
    # The bundled app's start-up and chat template, as platform switches (deploy_env wins).
    snapshot: bool = _field(False, ("modal",), _BOOL)
    thinking: bool | None = _field(None, ("modal",), _BOOL)
    command: tuple[str, ...] = _field((), ("process",), _LIST_OF_STRINGS)
    env: Mapping[str, str] = _field({}, ("process",), _TABLE_OF_STRINGS)
    script: str | None = _field(None, ("stub",))
    cold_start: float = _field(0.0, ("stub",), _NUM)
    wake_timeout: float | None = _field(None, toml=_NUM)
    keep_alive: str | None = _field(None)
    keep_alive_interval: float = _field(60.0, toml=_NUM)
    capabilities: tuple[str, ...] = _field(("streaming",), toml=_LIST_OF_STRINGS)
    client: Mapping[str, Any] = _field({}, toml=("a table", dict))
    # Internal: a check run before a built-in process starts (the `local` platform uses it to
    # say which package to install). Not a user-facing field.
    preflight: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # Internal: where relative paths (`script`, `modal_app`) are resolved from: the directory
    # of the file that defined the platform.
    base_dir: str | None = field(default=None, repr=False, compare=False)

    def resolve_path(self, path: str) -> Path:
        """`path` made absolute against the directory of the defining file."""
        candidate = Path(os.path.expanduser(path))
        if candidate.is_absolute() or self.base_dir is None:
            return candidate
        return Path(self.base_dir) / candidate

    def target(self) -> str:
        """What the platform points at, for listings (never a secret)."""
        if self.kind == "url":
            return self.base_url or ""
        if self.kind == "modal":
            return f"modal app {self.app}/{self.server or self.function or 'serve'}"
        if self.kind == "process":
            return " ".join(self.command)
        return f"in-process stub (script={self.script})" if self.script else "in-process stub"


# The user-facing fields (and `kind`), each with the kinds it belongs to and its TOML type.
_SCHEMA = {f.name: f.metadata for f in fields(Platform) if "kinds" in f.metadata}
FIELD_KINDS: dict[str, tuple[str, ...]] = {"kind": KINDS} | {
    name: meta["kinds"] for name, meta in _SCHEMA.items()
}
_FIELD_TYPES: dict[str, tuple[str, Any]] = {"kind": _STR} | {
    name: meta["toml"] for name, meta in _SCHEMA.items()
}


def _closest(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    import difflib  # only on the error path

    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def validate(
    name: str, table: Mapping[str, Any], source: str, base_dir: str | None = None
) -> Platform:
    """Turn one TOML table into a `Platform`, or raise `ConfigError` naming what is wrong."""
    where = f"in {source}"
    kind = table.get("kind")
    if kind is None:
        raise ConfigError(
            f"no 'kind' {where}",
            f"add kind = one of {', '.join(map(repr, KINDS))} to the table",
            platform=name,
        )
    if kind not in KINDS:
        raise ConfigError(
            f"unknown kind {kind!r}{_closest(str(kind), KINDS)} {where}",
            f"use one of {', '.join(map(repr, KINDS))}",
            platform=name,
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in FIELD_KINDS:
            raise ConfigError(
                f"unknown field {key!r}{_closest(key, list(FIELD_KINDS))} {where}",
                f"valid fields for kind {kind!r} are {', '.join(_fields_for(kind))}",
                platform=name,
            )
        if kind not in FIELD_KINDS[key]:
            raise ConfigError(
                f"field {key!r} does not apply to kind {kind!r} {where} "
                f"(it is for kind {' or '.join(map(repr, FIELD_KINDS[key]))})",
                f"remove {key!r}, or change kind",
                platform=name,
            )
        label, expected = _FIELD_TYPES[key]
        # bool is an int in Python; a number field must not accept true/false.
        if not isinstance(value, expected) or (expected is _NUM[1] and isinstance(value, bool)):
            raise ConfigError(
                f"field {key!r} must be {label}, got {value!r} {where}",
                f"write {key} as {label}",
                platform=name,
            )
        values[key] = _check_value(name, key, value, kind, where)
    _check_required(name, kind, values, where)
    values.pop("kind")
    return Platform(name=name, kind=kind, source=source, base_dir=base_dir, **values)


def _fields_for(kind: str) -> list[str]:
    return [f for f, kinds in FIELD_KINDS.items() if kind in kinds]


def _check_value(name: str, key: str, value: Any, kind: str, where: str) -> Any:
    """Per-field checks beyond the TOML type; returns the value in its stored form."""
    if key in ("command", "capabilities"):
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(
                f"field {key!r} must be a list of strings, got {value!r} {where}",
                f'write {key} = ["..."]',
                platform=name,
            )
        if key == "command" and not value:
            raise ConfigError(
                f"field 'command' is empty {where}",
                'give the argv list, e.g. command = ["vllm", "serve", "{model}", "--port", '
                '"{port}"]',
                platform=name,
            )
        return tuple(value)
    if key in ("deploy_env", "env"):
        bad = [k for k, v in value.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ConfigError(
                f"field {key!r} must map names to strings; {bad[0]!r} is not {where}",
                f'write {key} = {{ NAME = "value" }}',
                platform=name,
            )
        return {k: _toml_scalar_to_env(v) for k, v in value.items()}
    if key in ("wake_timeout", "keep_alive_interval") and value <= 0:
        raise ConfigError(
            f"field {key!r} must be a positive number of seconds, got {value!r} {where}",
            f"set {key} to a number above 0",
            platform=name,
        )
    if key == "cold_start" and value < 0:
        raise ConfigError(
            f"field 'cold_start' must be 0 or more seconds, got {value!r} {where}",
            "set cold_start to a number of seconds",
            platform=name,
        )
    if key == "keep_alive":
        if value not in KEEP_ALIVE_MODES:
            raise ConfigError(
                f"keep_alive {value!r}{_closest(value, KEEP_ALIVE_MODES)} is not a mode {where}",
                f"use one of {', '.join(map(repr, KEEP_ALIVE_MODES))}",
                platform=name,
            )
        if value == "autoscaler" and kind != "modal":
            raise ConfigError(
                f"keep_alive 'autoscaler' needs kind 'modal', this platform is {kind!r} {where}",
                "use keep_alive = 'ping' or 'off'",
                platform=name,
            )
    if key == "client":
        for option in value:
            if option not in CLIENT_OPTIONS:
                raise ConfigError(
                    f"unknown client option {option!r}{_closest(option, CLIENT_OPTIONS)} {where}",
                    f"valid client options are {', '.join(CLIENT_OPTIONS)}",
                    platform=name,
                )
        return dict(value)
    if key == "base_url":
        check_base_url(name, value, where)
    return value


def _toml_scalar_to_env(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def check_base_url(name: str, url: str, where: str) -> None:
    """A base URL must be http(s) and end in `/v1` (or have no path at all)."""
    if "${" in url:
        return  # checked again after expansion
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(
            f"base_url {url!r} is not an http(s) URL {where}",
            "write base_url as https://HOST/v1",
            platform=name,
        )
    path = re.sub(r"^https?://[^/]+", "", url).rstrip("/")
    if path and not path.endswith("/v1"):
        raise ConfigError(
            f"base_url {url!r} does not end in /v1 {where}",
            f"use {url.rstrip('/')}/v1 if the server's OpenAI API is there",
            platform=name,
        )


def normalize_base_url(url: str) -> str:
    """`https://host` and `https://host/` become `https://host/v1`; `/v1/` loses its slash."""
    url = url.rstrip("/")
    if not re.sub(r"^https?://[^/]+", "", url):
        url += "/v1"
    return url


def _check_required(name: str, kind: str, values: Mapping[str, Any], where: str) -> None:
    required = {"url": ["base_url"], "modal": ["app"], "process": ["command"]}.get(kind, [])
    for key in required:
        if key not in values:
            raise ConfigError(
                f"kind {kind!r} needs field {key!r}, missing {where}",
                f"add {key} = ... to the table",
                platform=name,
            )
    if kind == "modal" and "function" in values and "server" in values:
        raise ConfigError(
            f"both 'function' and 'server' are set {where}",
            "a modal platform targets one: a @modal.web_server function or an @app.server class",
            platform=name,
        )


# ---------------------------------------------------------------- built-ins

BUNDLED_LLAMA = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
BUNDLED_QWEN = "Qwen/Qwen3-8B-FP8"


def builtin_platforms() -> dict[str, Platform]:
    """The platforms every installation knows."""
    # Imported here: the launcher module is only needed when `local` is looked at.
    from .local_model import local_command, preflight_local

    full = ("streaming", "tools", "json_schema")
    return {
        "stub": Platform(name="stub", kind="stub", capabilities=full),
        "local": Platform(
            name="local",
            kind="process",
            command=local_command(),
            capabilities=("streaming", "json_schema"),
            wake_timeout=120.0,
            preflight=preflight_local,
        ),
        "env": Platform(
            name="env",
            kind="url",
            base_url="${VLLM_API_URL}",
            model="${VLLM_MODEL:-}",
        ),
        "modal-llama": Platform(
            name="modal-llama",
            kind="modal",
            app="modal-vllm-llama",
            model=BUNDLED_LLAMA,
            deploy_env={"MODEL_NAME": BUNDLED_LLAMA, "APP_NAME": "modal-vllm-llama"},
            capabilities=("streaming", "json_schema"),
        ),
        "modal-qwen": Platform(
            name="modal-qwen",
            kind="modal",
            app="modal-vllm-qwen",
            model=BUNDLED_QWEN,
            deploy_env={
                "MODEL_NAME": BUNDLED_QWEN,
                "APP_NAME": "modal-vllm-qwen",
                "TOOL_CALL_PARSER": "hermes",
                # With thinking on (`thinking = true`), the parser moves <think> blocks out
                # of `content`, so tests see only the answer.
                "VLLM_ARGS": "--reasoning-parser qwen3",
            },
            # Qwen3 at temperature 0 with thinking on tends to loop until the context is
            # full: thinking off, and a bounded answer for LangChain clients.
            thinking=False,
            client={"max_tokens": 1024},
            capabilities=full,
        ),
    }


# ---------------------------------------------------------------- loading


def read_toml(path: Path, what: str = "TOML file") -> dict[str, Any]:
    """The parsed TOML file, or `ConfigError` naming the file (missing, invalid)."""
    try:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {str(path)!r} does not exist",
            "check the path given to --vllm-config / vllm_config / MODAL_VLLM_CONFIG",
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(
            f"{what} {str(path)!r} is not valid TOML: {error}", "fix the syntax"
        ) from None


def _tables(data: Any, source: str, prefix: str, base_dir: Path) -> dict[str, Platform]:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix} in {source} must be a table of platform tables",
            f"write one [{prefix}.NAME] table per platform",
        )
    found = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{prefix}.{name} in {source} must be a table",
                f"write [{prefix}.{name}] followed by its fields",
                platform=name,
            )
        found[name] = validate(name, table, source, str(base_dir))
    return found


def load_platforms(rootdir: Path | None, config_file: str | None) -> dict[str, Platform]:
    """All known platforms: built-ins, then pyproject.toml, then the config file."""
    platforms = builtin_platforms()
    if rootdir is not None:
        pyproject = rootdir / "pyproject.toml"
        if pyproject.is_file():
            data = read_toml(pyproject, "pyproject.toml")
            section = data.get("tool", {}).get("modal-vllm", {})
            if isinstance(section, dict):
                unknown = set(section) - {"platforms"}
                if unknown:
                    key = sorted(unknown)[0]
                    raise ConfigError(
                        f"unknown key [tool.modal-vllm.{key}] in pyproject.toml"
                        f"{_closest(key, ['platforms'])}",
                        "platforms go in [tool.modal-vllm.platforms.NAME] tables",
                    )
                platforms.update(
                    _tables(
                        section.get("platforms", {}),
                        "pyproject.toml",
                        "tool.modal-vllm.platforms",
                        rootdir,
                    )
                )
    if config_file:
        path = Path(config_file)
        if not path.is_absolute() and rootdir is not None and not path.exists():
            path = rootdir / path
        data = read_toml(path, "platform file")
        unknown = set(data) - {"platforms"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(
                f"unknown top-level key {key!r} in {config_file}{_closest(key, ['platforms'])}",
                "platforms go in [platforms.NAME] tables",
            )
        platforms.update(
            _tables(data.get("platforms", {}), str(config_file), "platforms", path.resolve().parent)
        )
    return platforms


def select(known: Mapping[str, Platform], names: list[str]) -> list[Platform]:
    """The platforms named on the command line, in order, or `ConfigError` for an unknown one."""
    chosen = []
    for name in names:
        if name not in known:
            raise ConfigError(
                f"unknown platform {name!r}{_closest(name, list(known))}",
                f"use one of {', '.join(sorted(known))}, or define it in "
                f"[tool.modal-vllm.platforms.{name}] in pyproject.toml",
            )
        chosen.append(known[name])
    return chosen
