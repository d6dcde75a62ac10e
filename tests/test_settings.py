"""Settings: command line > environment > ini > platform field > default, each with its source,
and the .env file rules (where it is, what it may override, that reading it changes nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST

from pytest_modal_vllm.errors import ConfigError
from pytest_modal_vllm.settings import (
    DEFAULTS,
    OPTIONS,
    apply_env_file,
    env_file_path,
    read_env_file,
    resolve,
)


def run(
    cli: dict[str, Any] | None = None,
    ini: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Any:
    return resolve(cli or {}, ini or {}, env or {})


# ---------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("cli", "env", "ini", "value", "source"),
    [
        (5.0, "7", "9", 5.0, "command line"),
        (None, "7", "9", 7.0, "env MODAL_VLLM_WAKE_TIMEOUT"),
        (None, None, "9", 9.0, "ini vllm_wake_timeout"),
        (None, None, None, None, "default"),
        (None, "", "9", 9.0, "ini vllm_wake_timeout"),  # an empty variable counts as unset
        (None, None, "", None, "default"),  # so does an empty ini value
        (None, None, " 12.5 ", 12.5, "ini vllm_wake_timeout"),
    ],
)
def test_wake_timeout_precedence(cli, env, ini, value, source) -> None:
    settings = run(
        {"wake_timeout": cli},
        {"vllm_wake_timeout": ini},
        {"MODAL_VLLM_WAKE_TIMEOUT": env} if env is not None else {},
    )
    assert settings["wake_timeout"] == value
    assert settings.sources["wake_timeout"] == source


@pytest.mark.parametrize(
    ("cli", "env", "ini", "value", "source"),
    [
        ("skip", "fail", "fail", "skip", "command line"),
        (None, "skip", "fail", "skip", "env MODAL_VLLM_UNAVAILABLE"),
        (None, None, "skip", "skip", "ini vllm_unavailable"),
        (None, None, None, "fail", "default"),
    ],
)
def test_unavailable_precedence(cli, env, ini, value, source) -> None:
    settings = run(
        {"unavailable": cli},
        {"vllm_unavailable": ini},
        {"MODAL_VLLM_UNAVAILABLE": env} if env else {},
    )
    assert (settings["unavailable"], settings.sources["unavailable"]) == (value, source)


def test_every_option_has_a_default_and_a_source() -> None:
    settings = run()
    for option in OPTIONS:
        assert settings[option.dest] == DEFAULTS[option.dest]
        assert settings.sources[option.dest] == "default"
    assert settings.platforms == []


def test_flags_come_from_the_command_line_only() -> None:
    settings = run({"no_wake": True, "deploy": False}, {}, {"MODAL_VLLM_NO_WAKE": "1"})
    assert settings["no_wake"] is True
    assert settings.sources["no_wake"] == "command line"
    assert settings["deploy"] is False
    assert settings.sources["deploy"] == "default"


def test_every_source_at_once_is_described() -> None:
    settings = run(
        {"keep_alive": "off"},
        {"vllm_report": "out.json", "vllm_unavailable": "skip"},
        {"MODAL_VLLM_CONFIG": "extra.toml", "MODAL_VLLM_UNAVAILABLE": "fail"},
    )
    assert settings.describe("keep_alive") == "keep_alive=off (command line)"
    assert settings.describe("config") == "config=extra.toml (env MODAL_VLLM_CONFIG)"
    assert settings.describe("report") == "report=out.json (ini vllm_report)"
    assert settings.describe("unavailable") == "unavailable=fail (env MODAL_VLLM_UNAVAILABLE)"


def test_an_empty_ini_value_is_kept_only_for_the_env_file() -> None:
    settings = run({}, {"vllm_env_file": "", "vllm_report": ""})
    assert (settings["env_file"], settings.sources["env_file"]) == ("", "ini vllm_env_file")
    assert (settings["report"], settings.sources["report"]) == (None, "default")


# ---------------------------------------------------------------------------- platform names


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected", "source"),
    [
        (["stub"], None, None, ["stub"], "command line"),
        (["stub,local", "env stub", "local"], None, None, ["stub", "local", "env"], "command line"),
        ([" a , b,,a "], None, None, ["a", "b"], "command line"),
        (
            None,
            "modal-qwen, stub,modal-qwen",
            None,
            ["modal-qwen", "stub"],
            "env MODAL_VLLM_PLATFORM",
        ),
        (None, None, "stub local\nstub", ["stub", "local"], "ini vllm_platform"),
        (None, None, ["stub", "local,env"], ["stub", "local", "env"], "ini vllm_platform"),
        (["stub"], "local", "env", ["stub"], "command line"),
        (None, None, None, [], "default"),
    ],
)
def test_platform_names_split_and_deduplicated(cli, env, ini, expected, source) -> None:
    settings = run(
        {"platform": cli},
        {"vllm_platform": ini},
        {"MODAL_VLLM_PLATFORM": env} if env else {},
    )
    assert settings.platforms == expected
    assert settings.sources["platform"] == source


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("ini", "env", "fragment"),
    [
        (
            {},
            {"MODAL_VLLM_WAKE_TIMEOUT": "abc"},
            "environment variable MODAL_VLLM_WAKE_TIMEOUT: 'abc' is not a number of seconds",
        ),
        ({}, {"MODAL_VLLM_WAKE_TIMEOUT": "-3"}, "'-3' must be a positive number of seconds"),
        ({}, {"MODAL_VLLM_WAKE_TIMEOUT": "nan"}, "'nan' must be a positive number"),
        ({}, {"MODAL_VLLM_WAKE_TIMEOUT": "inf"}, "'inf' must be a positive number"),
        (
            {},
            {"MODAL_VLLM_KEEP_ALIVE": "always"},
            "environment variable MODAL_VLLM_KEEP_ALIVE is 'always', which is not one of ping, "
            "autoscaler, off",
        ),
        ({"vllm_unavailable": "nope"}, {}, "ini vllm_unavailable is 'nope'"),
        ({"vllm_wake_timeout": "0"}, {}, "ini vllm_wake_timeout: '0' must be a positive"),
        ({"vllm_keep_alive": ["ping"]}, {}, "ini vllm_keep_alive is a list"),
    ],
)
def test_bad_environment_and_ini_values_are_config_errors(ini, env, fragment) -> None:
    with pytest.raises(ConfigError) as info:
        run({}, ini, env)
    assert fragment in str(info.value)
    assert "Fix:" in str(info.value)
    assert info.value.exit_code == 4


def test_a_bad_value_is_not_checked_when_a_higher_source_wins() -> None:
    settings = run(
        {"wake_timeout": 3.0}, {"vllm_wake_timeout": "abc"}, {"MODAL_VLLM_WAKE_TIMEOUT": "abc"}
    )
    assert settings["wake_timeout"] == 3.0


# ---------------------------------------------------------------------------- env file path


def test_env_file_default_is_dotenv_in_rootdir(tmp_path: Path) -> None:
    assert env_file_path(None, tmp_path) is None  # no .env: nothing to load, no error
    (tmp_path / ".env").write_text("A=1\n")
    assert env_file_path(None, tmp_path) == tmp_path / ".env"


def test_env_file_empty_string_disables_even_the_default(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=1\n")
    assert env_file_path("", tmp_path) is None


def test_env_file_explicit_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ci.env").write_text("A=1\n")
    assert env_file_path(str(tmp_path / "ci.env"), None) == tmp_path / "ci.env"
    # A relative path is looked up in the current directory, then in the rootdir.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert env_file_path("ci.env", tmp_path) == tmp_path / "ci.env"
    (elsewhere / "ci.env").write_text("A=2\n")
    assert env_file_path("ci.env", tmp_path) == Path("ci.env")


def test_env_file_missing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        env_file_path("missing.env", tmp_path)
    assert "the env file 'missing.env' does not exist" in str(info.value)
    assert "Fix:" in str(info.value)
    with pytest.raises(ConfigError):
        env_file_path(str(tmp_path), tmp_path)  # a directory is not a file


def test_read_env_file_does_not_touch_os_environ(tmp_path: Path) -> None:
    name = "PYTEST_MODAL_VLLM_TEST_ONLY_IN_FILE"
    assert name not in os.environ
    before = dict(os.environ)
    path = tmp_path / ".env"
    path.write_text(f'{name}=from-file\nexport QUOTED="a b"\nEMPTY=\n# comment\nNOVALUE\n')
    values = read_env_file(path)
    assert values == {name: "from-file", "QUOTED": "a b", "EMPTY": ""}
    assert dict(os.environ) == before
    assert read_env_file(None) == {}


def test_apply_env_file_lets_existing_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    existing, new = "PYTEST_MODAL_VLLM_TEST_EXISTING", "PYTEST_MODAL_VLLM_TEST_NEW"
    monkeypatch.setenv(existing, "from-environment")
    monkeypatch.delenv(new, raising=False)
    try:
        added = apply_env_file({existing: "from-file", new: "from-file"})
        assert added == [new]
        assert os.environ[existing] == "from-environment"
        assert os.environ[new] == "from-file"
    finally:
        os.environ.pop(new, None)


# ---------------------------------------------------------------------------- through pytest

ENV_TEST = """
import os

def test_env(vllm_endpoint, vllm_platform):
    assert vllm_platform == "stub"
    print("KEY", vllm_endpoint.api_key == os.environ["VLLM_API_KEY"], os.environ["VLLM_API_KEY"])
    print("ONLY", os.environ.get("PYTEST_MODAL_VLLM_ONLY_IN_FILE"))
"""


def test_dotenv_in_rootdir_selects_the_platform_and_provides_the_key(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nvllm_wake_timeout = "9"\n')
    pytester.path.joinpath(".env").write_text(
        "MODAL_VLLM_PLATFORM=stub\nVLLM_API_KEY=key-from-file\n"
        "MODAL_VLLM_WAKE_TIMEOUT=8\nPYTEST_MODAL_VLLM_ONLY_IN_FILE=yes\n"
    )
    pytester.makepyfile(test_env=ENV_TEST)
    monkeypatch.delenv("PYTEST_MODAL_VLLM_ONLY_IN_FILE", raising=False)

    result = pytester.runpytest_subprocess(*FAST, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "vllm: stub -> http://127.0.0.1:*/v1 model=stub woke in *",
            "vllm: stub wake_timeout=8 (env MODAL_VLLM_WAKE_TIMEOUT)*",
            "*KEY True key-from-file",
            "ONLY yes",
        ]
    )

    # Variables already set in the environment win over the file; the command line wins over
    # both.
    monkeypatch.setenv("VLLM_API_KEY", "key-from-environment")
    monkeypatch.setenv("MODAL_VLLM_WAKE_TIMEOUT", "7")
    result = pytester.runpytest_subprocess(*FAST, "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "vllm: stub wake_timeout=7 (env MODAL_VLLM_WAKE_TIMEOUT)*",
            "*KEY True key-from-environment",
        ]
    )
    result = pytester.runpytest_subprocess(*FAST, "-s", "--vllm-wake-timeout=6")
    result.stdout.fnmatch_lines(["vllm: stub wake_timeout=6 (command line)*"])

    # An empty --vllm-env-file loads no file: no platform is selected, the test is skipped.
    monkeypatch.delenv("MODAL_VLLM_WAKE_TIMEOUT")
    result = pytester.runpytest_subprocess(*FAST, "-rs", "--vllm-env-file=")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no LLM platform selected: pass --vllm-platform=NAME*"])
    assert "PYTEST_MODAL_VLLM_ONLY_IN_FILE" not in os.environ  # this process is untouched


def test_env_file_named_in_the_environment_is_read(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.path.joinpath("ci.env").write_text("MODAL_VLLM_PLATFORM=stub\n")
    pytester.path.joinpath(".env").write_text("MODAL_VLLM_PLATFORM=nope\n")  # not read
    pytester.makepyfile(
        test_env="def test_env(vllm_platform):\n    assert vllm_platform == 'stub'\n"
    )
    monkeypatch.setenv("MODAL_VLLM_ENV_FILE", "ci.env")
    result = pytester.runpytest_subprocess(*FAST)
    result.assert_outcomes(passed=1)
