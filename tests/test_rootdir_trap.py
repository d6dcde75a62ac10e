"""The rootdir trap: `--vllm-config PATH` (a space, not `=`) whose PATH pytest took for a test
path before the plugin was loaded, moving the rootdir and the ini file.

Each case is a real pytest run (pytester) in a project with its own ini file; the trap is a
platform file in another tree that has an ini file of its own, as in this repository
(`examples/pyproject.toml` beside `examples/platforms/`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST

from pytest_modal_vllm import rootdir_trap
from pytest_modal_vllm.rootdir_trap import spaced_values

# The project's ini file: its marker shows which ini file a run used.
PROJECT_INI = '[tool.pytest.ini_options]\nmarkers = ["project_ini: set by the project"]\n'
OTHER_INI = "[tool.pytest.ini_options]\n"
PLATFORM = '[platforms.elsewhere]\nkind = "stub"\n'
# Passes only under the project's ini file (--strict-markers from the command line below).
TEST = """
import pytest

@pytest.mark.project_ini
def test_llm(vllm_endpoint):
    assert vllm_endpoint.platform == "elsewhere"
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project (pyproject.toml with a marker) and `other/tree/` with its own ini file and a
    platform file."""
    pytester.path.joinpath("pyproject.toml").write_text(PROJECT_INI)
    other = pytester.path / "other" / "tree"
    other.mkdir(parents=True)
    (other / "pyproject.toml").write_text(OTHER_INI)
    (other / "platforms.toml").write_text(PLATFORM)
    pytester.makepyfile(test_llm=TEST)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, str]:
    result = pytester.runpytest_subprocess(*FAST, "--strict-markers", *args, timeout=60)
    return result, result.stdout.str() + "\n" + result.stderr.str()


def test_space_form_into_another_tree_stops_with_exit_4_and_the_fix(project) -> None:
    result, text = run(
        project, "--vllm-config", "other/tree/platforms.toml", "--vllm-platform=elsewhere"
    )
    assert result.ret == 4, text
    root = project.path
    assert "`--vllm-config other/tree/platforms.toml` is written with a space" in text
    assert f"chose rootdir {root / 'other' / 'tree'} and ini file " in text
    assert f"instead of rootdir {root} and ini file {root / 'pyproject.toml'}" in text
    assert (
        "Fix: write --vllm-config=other/tree/platforms.toml (with '='), or set vllm_config in "
        "the ini file." in text
    )
    assert "Traceback" not in text and "passed" not in text
    # One paragraph: the whole message is a single line.
    (line,) = [line for line in text.splitlines() if "written with a space" in line]
    assert line.startswith("ERROR: vllm: ")


def test_the_equals_form_keeps_the_project_rootdir_and_runs(project) -> None:
    result, text = run(
        project, "--vllm-config=other/tree/platforms.toml", "--vllm-platform=elsewhere"
    )
    result.assert_outcomes(passed=1)
    assert f"rootdir: {project.path}" in text
    assert "written with a space" not in text


def test_the_ini_key_works_too(project) -> None:
    project.path.joinpath("pyproject.toml").write_text(
        PROJECT_INI + 'vllm_config = "other/tree/platforms.toml"\n'
    )
    result, _ = run(project, "--vllm-platform", "elsewhere")
    result.assert_outcomes(passed=1)


def test_a_harmless_space_form_value_still_works(project) -> None:
    """A platform file under the project, in a folder without an ini file: the common ancestor
    is the project, nothing moves, nothing is said."""
    conf = project.path / "conf"
    conf.mkdir()
    (conf / "platforms.toml").write_text(PLATFORM)
    result, text = run(
        project, "--vllm-config", "conf/platforms.toml", "--vllm-platform", "elsewhere"
    )
    result.assert_outcomes(passed=1)
    assert f"rootdir: {project.path}" in text
    assert "written with a space" not in text


def test_a_space_form_beside_a_test_path_that_keeps_the_rootdir(project) -> None:
    """With the test file named too, the common ancestor is the project again: harmless."""
    result, text = run(
        project,
        "--vllm-config",
        "other/tree/platforms.toml",
        "--vllm-platform=elsewhere",
        "test_llm.py",
    )
    result.assert_outcomes(passed=1)
    assert "written with a space" not in text


@pytest.mark.parametrize(
    ("args", "flag", "ini"),
    [
        (("--vllm-report", "other/tree/report.json"), "--vllm-report", "vllm_report"),
        (("--vllm-env-file", "other/tree/settings.env"), "--vllm-env-file", "vllm_env_file"),
        (("--vllm-platform", "other"), "--vllm-platform", "vllm_platform"),
    ],
    ids=["report", "env-file", "platform-name-that-is-a-folder"],
)
def test_every_value_option_is_checked(project, args, flag, ini) -> None:
    (project.path / "other" / "tree" / "report.json").write_text("{}")
    (project.path / "other" / "tree" / "settings.env").write_text("")
    (project.path / "other" / "pyproject.toml").write_text(OTHER_INI)
    result, text = run(project, *args)
    assert result.ret == 4, text
    assert f"Fix: write {flag}={args[1]} (with '='), or set {ini} in the ini file." in text


def test_pytest_addopts_is_checked_too(project, monkeypatch) -> None:
    monkeypatch.setenv("PYTEST_ADDOPTS", "--vllm-config other/tree/platforms.toml")
    result, text = run(project, "--vllm-platform=elsewhere")
    assert result.ret == 4, text
    assert "--vllm-config=other/tree/platforms.toml" in text


def test_help_is_never_stopped(project) -> None:
    result, text = run(project, "--vllm-config", "other/tree/platforms.toml", "--help")
    assert result.ret == 0, text
    assert "written with a space" not in text


# ---------------------------------------------------------------------------- guards


def test_spaced_values_keeps_existing_paths_only(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("")
    args = [
        "--vllm-config", "a.toml",
        "--vllm-report", "missing.json",
        "--vllm-platform", "-x",
        "--vllm-env-file=a.toml",
        "--", "--vllm-config", "a.toml",
    ]  # fmt: skip
    (found,) = spaced_values(args, tmp_path)
    assert (found.option.flag, found.value, found.index) == ("--vllm-config", "a.toml", 0)


def _pytest8_signature(
    *, inifile: str | None, args: list[str], rootdir_cmd_arg: str | None, invocation_dir: Path
) -> tuple[Any, ...]:
    """pytest 8.4's keyword-only `determine_setup`, returning 3 values."""
    from _pytest.config.findpaths import determine_setup as real

    kwargs: dict[str, Any] = dict(
        inifile=inifile, args=args, rootdir_cmd_arg=rootdir_cmd_arg, invocation_dir=invocation_dir
    )
    if "override_ini" in inspect.signature(real).parameters:
        kwargs["override_ini"] = None
    return tuple(real(**kwargs)[:3])


def _unknown_signature(*, inifile: str | None, args: list[str], future_required: object) -> Any:
    raise AssertionError("must not be called: it needs a keyword the plugin does not know")


@pytest.mark.parametrize(
    "replacement", [_pytest8_signature, _unknown_signature], ids=["pytest-8.4-shape", "unknown"]
)
def test_determine_setup_guard(project, monkeypatch, replacement) -> None:
    """pytest's private `determine_setup` changed between 8 and 9: the plugin calls it with the
    keywords its signature has, reads 3 or 4 results, and without it falls back to its own
    search (rootdirs only), which still finds the trap."""
    monkeypatch.setattr(rootdir_trap, "_pytest_determine_setup", lambda: replacement)
    result = project.runpytest_inprocess(
        *FAST, "--vllm-config", "other/tree/platforms.toml", "--vllm-platform=elsewhere"
    )
    assert result.ret == 4
    text = result.stdout.str() + result.stderr.str()
    assert "Fix: write --vllm-config=other/tree/platforms.toml (with '=')" in text
    harmless = project.runpytest_inprocess(
        *FAST,
        "--vllm-config",
        "other/tree/platforms.toml",
        "--vllm-platform=elsewhere",
        "test_llm.py",
    )
    harmless.assert_outcomes(passed=1)
