"""Every option of the plugin, declared once and resolved once, with the source of each value.

Precedence, highest first (resolved in `resolve()`):
    command line > environment (MODAL_VLLM_*) > ini (pytest config) > platform field > default
The platform-field and kind-default levels are applied per platform by
`resolution.resolve_platform`, since each selected platform may have its own `wake_timeout`
and `keep_alive`. The pytest plugin and the `modal-vllm` command both resolve through
`load()`; the command reads the ini values with `read_ini()` the way pytest finds them.

Values from the environment and ini are validated here and rejected with `ConfigError` (exit 4);
command-line values are validated by argparse `type=`/`choices=` while pytest parses them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .platforms import KEEP_ALIVE_MODES

if TYPE_CHECKING:
    import pytest

UNAVAILABLE_MODES = ("fail", "skip")
INI_UNSET = "<unset>"
# The words of an on/off value (`yes_no`; `resolution` reads a modal SNAPSHOT switch with them).
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def yes_no(text: str) -> bool:
    """Parse an on/off value from the environment or ini (`1`/`0`, `true`/`false`, ...)."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not one of 1, 0, true, false, yes, no, on, off")


def positive_seconds(text: str) -> float:
    """Parse a positive number of seconds (argparse `type=`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class Option:
    """One setting: its command-line flag, ini key and environment variable."""

    dest: str
    flag: str
    help: str
    ini: str | None = None
    env: str | None = None
    choices: tuple[str, ...] = ()
    parse: Callable[[str], Any] | None = None
    is_flag: bool = False
    repeatable: bool = False
    metavar: str | None = None
    # The value when no source gives one (flags: False).
    default: Any = None
    # The fix named when an environment or ini value does not parse.
    hint: str = "set it to a positive number, e.g. 600"


OPTIONS: tuple[Option, ...] = (
    Option(
        "platform",
        "--vllm-platform",
        "platform(s) to run against; repeatable and comma-separated",
        ini="vllm_platform",
        env="MODAL_VLLM_PLATFORM",
        repeatable=True,
        metavar="NAME",
        default=[],
    ),
    Option(
        "config",
        "--vllm-config",
        "extra TOML file with [platforms.NAME] tables",
        ini="vllm_config",
        env="MODAL_VLLM_CONFIG",
        metavar="PATH",
    ),
    Option(
        "env_file",
        "--vllm-env-file",
        "dotenv file loaded first (default: .env in the rootdir, if present; "
        "variables already set win; empty string disables)",
        ini="vllm_env_file",
        env="MODAL_VLLM_ENV_FILE",
        metavar="PATH",
    ),
    Option(
        "wake_timeout",
        "--vllm-wake-timeout",
        "seconds the blocking wake may take (overrides every platform's wake_timeout)",
        ini="vllm_wake_timeout",
        env="MODAL_VLLM_WAKE_TIMEOUT",
        parse=positive_seconds,
        metavar="SECONDS",
    ),
    Option("no_wake", "--vllm-no-wake", "skip the blocking wake", is_flag=True),
    Option(
        "keep_alive",
        "--vllm-keep-alive",
        "keep-alive mode for every platform: ping, autoscaler (modal only) or off",
        ini="vllm_keep_alive",
        env="MODAL_VLLM_KEEP_ALIVE",
        choices=KEEP_ALIVE_MODES,
        metavar="MODE",
    ),
    Option(
        "deploy",
        "--vllm-deploy",
        "deploy each selected modal platform's app before waking",
        is_flag=True,
    ),
    Option(
        "ephemeral",
        "--vllm-ephemeral",
        "run each selected modal platform's app as an ephemeral Modal app for this session",
        is_flag=True,
    ),
    Option(
        "unavailable",
        "--vllm-unavailable",
        "what happens when a platform cannot be woken: fail (default) or skip",
        ini="vllm_unavailable",
        env="MODAL_VLLM_UNAVAILABLE",
        choices=UNAVAILABLE_MODES,
        metavar="MODE",
        default="fail",
    ),
    Option(
        "report",
        "--vllm-report",
        "write the JSON usage report to this path",
        ini="vllm_report",
        env="MODAL_VLLM_REPORT",
        metavar="PATH",
    ),
    Option(
        "export_env",
        "--vllm-export-env",
        "export the selected platform as OPENAI_BASE_URL, OPENAI_API_BASE, OPENAI_API_KEY and "
        "OPENAI_MODEL for this session, for code that builds its own clients (one platform only)",
        ini="vllm_export_env",
        env="MODAL_VLLM_EXPORT_ENV",
        is_flag=True,
        parse=yes_no,
        hint="set it to 1 or 0 (or true/false)",
    ),
    Option(
        "list_platforms",
        "--vllm-list-platforms",
        "print every known platform (name, kind, source, model, target) and exit",
        is_flag=True,
    ),
)
OPTIONS_BY_DEST = {option.dest: option for option in OPTIONS}
DEFAULTS: dict[str, Any] = {o.dest: False if o.is_flag else o.default for o in OPTIONS}


def add_options(parser: pytest.Parser) -> None:
    """Declare every option and ini key on pytest's parser."""
    group = parser.getgroup("modal-vllm", "LLM endpoints (pytest-modal-vllm)")
    for option in OPTIONS:
        dest = f"vllm_{option.dest}"
        if option.is_flag:
            group.addoption(
                option.flag,
                action="store_true",
                default=False,
                dest=dest,
                help=option.help + (f" (env {option.env}=1)" if option.env else ""),
            )
        else:
            group.addoption(
                option.flag,
                action="append" if option.repeatable else "store",
                default=None,  # None = not given, so the environment and ini can apply
                dest=dest,
                metavar=option.metavar,
                choices=option.choices or None,
                type=option.parse,
                help=option.help + (f" (env {option.env})" if option.env else ""),
            )
        if option.ini:
            # A sentinel, not None: pytest 8 turns a None default into "", which would make an
            # absent `vllm_env_file` look like the empty string that disables .env.
            parser.addini(option.ini, option.help, default=INI_UNSET)


@dataclass(frozen=True)
class Settings:
    """The resolved options, each with where it came from."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    rootdir: Path | None = None
    env_file_values: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __getitem__(self, dest: str) -> Any:
        return self.values[dest]

    @property
    def platforms(self) -> list[str]:
        """The selected platform names, in order, without duplicates."""
        return list(self.values["platform"])

    def describe(self, dest: str) -> str:
        """`name=value (source)` for the report header."""
        return f"{dest}={self.values[dest]} ({self.sources[dest]})"


def _split_names(raw: list[str] | str) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    names: list[str] = []
    for item in items:
        for name in item.replace(",", " ").split():
            if name not in names:
                names.append(name)
    return names


def _from_text(option: Option, text: str, where: str) -> Any:
    """Validate a value that came from the environment or ini (argparse checked the CLI)."""
    if option.choices and text not in option.choices:
        raise ConfigError(
            f"{where} is {text!r}, which is not one of {', '.join(option.choices)}",
            f"set it to one of {', '.join(option.choices)} (or unset it)",
        )
    if option.parse is not None:
        try:
            return option.parse(text)
        except argparse.ArgumentTypeError as error:
            raise ConfigError(f"{where}: {error}", option.hint) from None
    return text


def resolve(
    cli: Mapping[str, Any],
    ini: Mapping[str, str | None],
    environ: Mapping[str, str],
    *,
    rootdir: Path | None = None,
) -> Settings:
    """Resolve every option: command line > environment > ini > default.

    `cli` maps dest -> parsed value or None when not given; `ini` maps ini key -> raw string or
    None when absent; `environ` is the process environment overlaid on the .env file's values.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        given = cli.get(option.dest)
        if option.is_flag:
            # A flag not given: its variable or ini key may still turn it on, else the default.
            given = True if given else None
        if given is not None:
            value, source = given, "command line"
        elif option.env and environ.get(option.env, "") != "":
            value = _from_text(option, environ[option.env], f"environment variable {option.env}")
            source = f"env {option.env}"
        elif option.ini and ini.get(option.ini) is not None:
            raw = ini[option.ini]
            assert raw is not None
            # pyproject's [tool.pytest.ini_options] hands TOML lists over as lists.
            if isinstance(raw, list):
                if not option.repeatable:
                    raise ConfigError(
                        f"ini {option.ini} is a list ({raw!r}), but it takes one value",
                        f'write {option.ini} = "..." as a single string',
                    )
                raw = " ".join(str(item) for item in raw)
            raw = str(raw)  # a TOML config file may hold numbers and booleans
            # An empty ini value is meaningful only for the env file (it disables .env).
            if raw == "" and option.dest != "env_file":
                value, source = DEFAULTS[option.dest], "default"
            else:
                value = raw if raw == "" else _from_text(option, raw.strip(), f"ini {option.ini}")
                source = f"ini {option.ini}"
        else:
            value, source = DEFAULTS[option.dest], "default"
        if option.dest == "platform":
            value = _split_names(value or [])
        values[option.dest], sources[option.dest] = value, source
    return Settings(values=values, sources=sources, rootdir=rootdir)


def env_file_path(settings_env_file: str | None, rootdir: Path | None) -> Path | None:
    """The dotenv file to read: the given one, else `.env` in the rootdir if it exists."""
    if settings_env_file == "":
        return None
    if settings_env_file is None:
        default = (rootdir or Path.cwd()) / ".env"
        return default if default.is_file() else None
    path = Path(settings_env_file)
    if not path.is_absolute() and rootdir is not None and not path.exists():
        path = rootdir / path
    if not path.is_file():
        raise ConfigError(
            f"the env file {settings_env_file!r} does not exist",
            "fix the path given to --vllm-env-file / vllm_env_file / MODAL_VLLM_ENV_FILE, "
            "or pass an empty string to load none",
        )
    return path


def read_env_file(path: Path | None) -> dict[str, str]:
    """The variables of a dotenv file, without touching `os.environ` (python-dotenv)."""
    if path is None:
        return {}
    from dotenv import dotenv_values  # imported only when a .env file exists

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def apply_env_file(values: Mapping[str, str]) -> list[str]:
    """Put the file's variables into `os.environ`; variables already set win. Returns names set."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    return added


def load(cli: Mapping[str, Any], ini: Mapping[str, Any], rootdir: Path | None = None) -> Settings:
    """Resolve the settings of a run, reading the .env file first (without applying it).

    `cli` maps option dest -> value or None; `ini` maps ini key -> raw value or None.
    """
    # The env file's location itself comes from CLI > env > ini, before .env can say anything.
    env_option = OPTIONS_BY_DEST["env_file"]
    env_file = cli.get("env_file")
    if env_file is None:
        env_file = os.environ.get(env_option.env or "")
    if env_file is None:
        env_file = ini.get(env_option.ini or "")
    file_values = read_env_file(env_file_path(env_file, rootdir))
    settings = resolve(cli, ini, {**file_values, **os.environ}, rootdir=rootdir)
    return Settings(settings.values, settings.sources, rootdir, file_values)


def from_pytest(config: pytest.Config) -> Settings:
    """The settings of a pytest run (command line, environment, .env, pytest's ini)."""
    cli = {option.dest: config.getoption(f"vllm_{option.dest}") for option in OPTIONS}
    ini = {
        option.ini: None if (value := config.getini(option.ini)) == INI_UNSET else value
        for option in OPTIONS
        if option.ini
    }
    return load(cli, ini, Path(config.rootpath))


# pytest's config files, in the order it looks for them in each directory, with the table
# that holds its settings (pytest 9 reads pytest.toml and [tool.pytest] natively).
_INI_FILES = (
    ("pytest.toml", ("pytest",)),
    (".pytest.toml", ("pytest",)),
    ("pytest.ini", ("pytest",)),
    (".pytest.ini", ("pytest",)),
    ("pyproject.toml", ("tool", "pytest", "ini_options")),
    ("pyproject.toml", ("tool", "pytest")),
    ("tox.ini", ("pytest",)),
    ("setup.cfg", ("tool:pytest",)),
)


def read_ini(start: Path) -> tuple[Path, dict[str, Any]]:
    """The rootdir and the `vllm_*` ini values, found as pytest finds its config file.

    The nearest directory from `start` upwards with a pytest config file is the rootdir; with
    none, as in pytest, the nearest with a `pyproject.toml`, else `start`. Only this plugin's
    keys are returned.
    """
    keys = {option.ini for option in OPTIONS if option.ini}
    for directory in (start, *start.parents):
        for name, table in _INI_FILES:
            values = _ini_table(directory / name, table)
            if values is not None:
                return directory, {k: v for k, v in values.items() if k in keys}
    for directory in (start, *start.parents):
        if (directory / "pyproject.toml").is_file():
            return directory, {}
    return start, {}


def _ini_table(path: Path, table: tuple[str, ...]) -> dict[str, Any] | None:
    """The table of a config file, or None when the file or the table is absent."""
    if not path.is_file():
        return None
    if path.suffix == ".toml":
        from .platforms import read_toml

        data: Any = read_toml(path)
        for key in table:
            data = data.get(key) if isinstance(data, dict) else None
        return dict(data) if isinstance(data, dict) else None
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path, encoding="utf-8")
    if parser.has_section(table[0]):
        return dict(parser[table[0]])
    # pytest.ini is the config file even without a [pytest] section.
    return {} if path.name in ("pytest.ini", ".pytest.ini") else None
