"""The rootdir trap: a value of ours, written after a space, that pytest took for a test path.

`pytest --vllm-config examples/platforms/vllm-cpu.toml` can move pytest's rootdir and ini file
(here to `examples/` and `examples/pyproject.toml`): the wrong settings and tests are used.

Why the plugin cannot prevent it (pytest 8.x and 9.x, `_pytest/config/__init__.py`):
`Config.parse()` (8.x: `Config._preparse()` -> `_initini()`) first runs
`self._parser.parse_known_args(args)` with only pytest's own options declared, then
`determine_setup(args=ns.file_or_dir, ...)` (`_pytest/config/findpaths.py`), which picks the
rootdir and the ini file from the common ancestor of the positional arguments that exist on
disk (`get_dirs_from_args`). At that first parse `--vllm-config` is an unknown option: argparse
sets it aside, and the next word, not starting with `-`, becomes a positional argument, a test
path. Entry-point plugins (`pytest11`: this one) are imported only afterwards, in the same
method (`self.pluginmanager.load_setuptools_entrypoints("pytest11")`), so their
`pytest_addoption` cannot declare the option in time, and no hook of theirs is registered for
the earlier calls (`pytest_addhooks`, `pytest_cmdline_parse` reach only pytest's own plugins and
those passed to `pytest.main(plugins=...)`; `-p NAME` and `PYTEST_PLUGINS` load at the same
later point). Only code run at interpreter start-up (a `.pth` file patching pytest) could act
earlier, and a test plugin has no business changing every Python process. `--vllm-config=PATH`
is a single token starting with `-`, which `get_dirs_from_args` ignores: that form is safe.

So the plugin detects it instead, before anything runs: for each of its value options written
in the space form whose value exists on disk, the rootdir and ini file are computed twice, with
that value taken for a test path (what pytest did) and without it. When they differ and pytest's
actual choice is not the clean one, the run stops with exit 4 and the fix. Nothing is said when
the value changed nothing.
"""

from __future__ import annotations

import inspect
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .settings import OPTIONS, Option

if TYPE_CHECKING:
    import pytest

#: The options whose value is a separate word when written with a space.
VALUE_OPTIONS: dict[str, Option] = {option.flag: option for option in OPTIONS if not option.is_flag}


@dataclass(frozen=True)
class Spaced:
    """One of our options written `--flag VALUE` (two words)."""

    option: Option
    value: str
    index: int  # of the flag in the argument list


#: The ini file of an approximated `Setup`: not known.
_UNKNOWN = Path("<unknown>")


@dataclass(frozen=True)
class Setup:
    """What pytest derives from the command line: the rootdir and the ini file (or None)."""

    rootdir: Path
    inifile: Path | None

    def describe(self) -> str:
        """`rootdir R and ini file F` for the message."""
        return f"rootdir {self.rootdir} and ini file {self.inifile or '(none)'}"


def spaced_values(args: Sequence[str], invocation_dir: Path) -> list[Spaced]:
    """Our options written with a space whose value pytest's first parse took for a path.

    Only values that do not start with `-` (argparse would take those for an option) and that
    exist on disk count: `determine_setup` ignores paths that do not exist.
    """
    found = []
    for index, word in enumerate(args[:-1]):
        if word == "--":
            break
        option = VALUE_OPTIONS.get(word)
        if option is None:
            continue
        value = args[index + 1]
        if value.startswith("-"):
            continue
        if (invocation_dir / value.split("::", 1)[0]).exists():
            found.append(Spaced(option, value, index))
    return found


def find_trap(config: pytest.Config) -> ConfigError | None:
    """The error to stop with when a spaced value of ours moved the rootdir or ini file."""
    option = config.option
    if getattr(option, "help", False) or getattr(option, "version", False):
        return None
    if hasattr(config, "workerinput"):  # an xdist worker: the controller checked already
        return None
    invocation_dir = Path(config.invocation_params.dir)
    # What pytest's first parse saw: PYTEST_ADDOPTS, then the command line (no ini addopts yet).
    args = shlex.split(os.environ.get("PYTEST_ADDOPTS", "")) + [
        str(arg) for arg in config.invocation_params.args
    ]
    spaced = spaced_values(args, invocation_dir)
    if not spaced:
        return None
    flags = {item.index for item in spaced}
    # As pytest saw it: our flag unknown, its value a positional word.
    as_seen = [arg for index, arg in enumerate(args) if index not in flags]
    # As meant: `--flag=VALUE`, one word.
    as_meant: list[str] = []
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        if index in flags:
            as_meant.append(f"{arg}={args[index + 1]}")
            skip = True
        else:
            as_meant.append(arg)
    actual = Setup(Path(config.rootpath), Path(config.inipath) if config.inipath else None)
    seen, meant = _setup(config, as_seen), _setup(config, as_meant)
    if seen is None or meant is None:
        return None
    if seen.inifile is _UNKNOWN or meant.inifile is _UNKNOWN:
        # The approximation tells rootdirs only, and is trusted only where it reproduces
        # what pytest did.
        if seen.rootdir != actual.rootdir:
            return None
        seen, meant = Setup(seen.rootdir, actual.inifile), Setup(meant.rootdir, None)
        if seen.rootdir == meant.rootdir:
            return None
        return _error(spaced, actual, meant, inifile_known=False)
    if seen == meant or actual == meant:
        return None  # the value changed nothing
    return _error(spaced, actual, meant)


def _error(
    spaced: list[Spaced], actual: Setup, meant: Setup, *, inifile_known: bool = True
) -> ConfigError:
    written = " and ".join(f"`{item.option.flag} {item.value}`" for item in spaced)
    paths = ", ".join(item.value for item in spaced)
    verb = "is" if len(spaced) == 1 else "are"
    noun = "a test path" if len(spaced) == 1 else "test paths"
    fixed = " ".join(f"{item.option.flag}={item.value}" for item in spaced)
    ini_keys = " / ".join(item.option.ini for item in spaced if item.option.ini)
    fix = f"write {fixed} (with '=')"
    if ini_keys:
        fix += f", or set {ini_keys} in the ini file"
    return ConfigError(
        f"{written} {verb} written with a space, so pytest took {paths} for {noun} before this "
        f"plugin was loaded and chose {actual.describe()} instead of "
        f"{meant.describe() if inifile_known else f'rootdir {meant.rootdir}'}: this "
        "run would use the wrong pytest settings and tests (pytest decides them before any "
        "plugin can declare its options)",
        fix,
    )


def _setup(config: pytest.Config, args: list[str]) -> Setup | None:
    """The rootdir and ini file pytest derives from `args`; None when it cannot be told."""
    parsed = _parse(config, args)
    if parsed is None:
        return None
    namespace, positional = parsed
    exact = _determine_setup(config, namespace, positional)
    if exact is not None:
        return exact
    return _approximate(config, namespace, positional)


def _parse(config: pytest.Config, args: list[str]) -> tuple[Any, list[str]] | None:
    """pytest's own parse of `args` (every option known now): namespace and positional words."""
    parser = getattr(config, "_parser", None)  # private, stable since pytest 2
    parse = getattr(parser, "parse_known_and_unknown_args", None)
    if parse is None:
        return None
    try:
        namespace, unknown = parse(list(args))
    except (Exception, SystemExit):  # the real parse succeeded; this one should too
        return None
    # pytest 8 passes the leftover words too (`ns.file_or_dir + unknown_args`); options among
    # them are ignored by `determine_setup`.
    return namespace, [*(getattr(namespace, "file_or_dir", None) or []), *unknown]


def _pytest_determine_setup() -> Callable[..., Sequence[Any]] | None:
    """pytest's `determine_setup`, where the installed pytest has it."""
    try:
        from _pytest.config.findpaths import determine_setup
    except ImportError:
        return None
    return determine_setup


def _determine_setup(config: pytest.Config, namespace: Any, positional: list[str]) -> Setup | None:
    """pytest's private `determine_setup`, called the way the installed pytest defines it.

    pytest 8.0 takes `inifile, args, rootdir_cmd_arg, invocation_dir` (positional or keyword),
    8.4 the same keyword-only, 9.x adds `override_ini`; it returns 3 values up to 8.x and 4
    from 9.0. Only known keywords are passed; an unknown required one means "cannot tell".
    """
    determine_setup = _pytest_determine_setup()
    if determine_setup is None:
        return None
    known: dict[str, Any] = {
        "inifile": getattr(namespace, "inifilename", None),
        "args": positional,
        "rootdir_cmd_arg": getattr(namespace, "rootdir", None) or None,
        "invocation_dir": Path(config.invocation_params.dir),
        "override_ini": getattr(namespace, "override_ini", None),
    }
    try:
        parameters = inspect.signature(determine_setup).parameters
    except (TypeError, ValueError):
        return None
    for name, parameter in parameters.items():
        if name not in known and parameter.default is inspect.Parameter.empty:
            return None
    try:
        result = determine_setup(**{k: v for k, v in known.items() if k in parameters})
    except Exception:  # pytest.UsageError and the like: the real run got past them
        return None
    rootdir, inifile = result[0], result[1]
    return Setup(Path(rootdir), Path(inifile) if inifile else None)


def _approximate(config: pytest.Config, namespace: Any, positional: list[str]) -> Setup | None:
    """Without `determine_setup`: the nearest directory with a pytest config file above the
    common ancestor of the existing positional paths (what `settings.read_ini` finds).

    Used only when it reproduces pytest's actual choice for the trapped arguments (checked by
    the caller comparing with the clean arguments), so it never invents a trap: with `-c` or
    `--rootdir`, the positional words cannot move anything and None is returned.
    """
    from .settings import read_ini

    if getattr(namespace, "inifilename", None) or getattr(namespace, "rootdir", None):
        return None
    invocation_dir = Path(config.invocation_params.dir)
    dirs = []
    for word in positional:
        if word.startswith("-"):
            continue
        path = invocation_dir / word.split("::", 1)[0]
        if path.exists():
            dirs.append(str((path if path.is_dir() else path.parent).resolve()))
    start = Path(os.path.commonpath(dirs)) if dirs else invocation_dir
    rootdir, _ = read_ini(start)
    return Setup(rootdir, _UNKNOWN)
