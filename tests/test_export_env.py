"""`--vllm-export-env` and `current_endpoint()`: code that builds its own clients reaches the
selected platform (pytester runs over real HTTP against a keyed fake endpoint on loopback).

The keyed server refuses any other key, so a self-built client that gets through proves the key
was exported; every output is scanned for it.
"""

from __future__ import annotations

import os

import pytest
from conftest import API_KEY, FAST, assert_no_secrets

from pytest_modal_vllm import Endpoint
from pytest_modal_vllm.errors import ConfigError
from pytest_modal_vllm.exports import EnvExport
from pytest_modal_vllm.settings import resolve

# Tests that build their own clients, as LangChain's standard suites and helpers do.
SELF_BUILT = """
import os
import openai
import pytest
from langchain_openai import ChatOpenAI


@pytest.mark.parametrize("i", range(2))
def test_openai_built_by_hand(i):
    client = openai.OpenAI()
    answer = client.chat.completions.create(
        model=os.environ["OPENAI_MODEL"], messages=[{"role": "user", "content": f"hi {i}"}]
    )
    assert answer.choices[0].message.content == f"echo: hi {i}"
    print("ran in", os.environ.get("PYTEST_XDIST_WORKER", "controller"))


def test_chat_openai_built_by_hand():
    model = ChatOpenAI(model=os.environ["OPENAI_MODEL"])
    assert model.invoke("hello").content == "echo: hello"
"""

# The real OpenAI key of a developer's shell: must neither reach the endpoint nor survive.
SHELL_KEY = "sk-shell-openai-5d7e"
DEAD_URL = "http://127.0.0.1:9/v1"


@pytest.fixture
def keyed(pytester, endpoint_server, write_platforms, monkeypatch) -> pytest.Pytester:
    """A project with a `keyed` url platform whose server requires API_KEY (in VLLM_API_KEY)."""
    server = endpoint_server(api_key=API_KEY, model="m-keyed")
    write_platforms({"keyed": {"kind": "url", "base_url": server.base_url}})
    monkeypatch.setenv("VLLM_API_KEY", API_KEY)
    for name in ("OPENAI_API_BASE", "OPENAI_MODEL"):
        monkeypatch.delenv(name, raising=False)
    # What a developer's shell may hold (a port on loopback: no test ever leaves the machine).
    monkeypatch.setenv("OPENAI_API_KEY", SHELL_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", DEAD_URL)
    pytester.makepyfile(test_self_built=SELF_BUILT)
    return pytester


def _text(result: pytest.RunResult) -> str:
    return result.stdout.str() + "\n" + result.stderr.str()


@pytest.mark.parametrize("workers", ["0", "2"])
def test_self_built_clients_reach_the_platform_in_workers_too(keyed, workers) -> None:
    args = ("--vllm-platform=keyed", "--vllm-export-env", "-rA")
    result = keyed.runpytest_subprocess("-p", "no:asyncio", "-n", workers, *args)
    result.assert_outcomes(passed=3)
    text = _text(result)
    if workers == "2":
        assert "ran in gw" in text  # the variables reached xdist's worker processes
    result.stdout.fnmatch_lines(
        [
            "vllm: keyed exported for code that builds its own clients (command line): "
            "OPENAI_BASE_URL=http://127.0.0.1:*/v1 (and OPENAI_API_BASE) OPENAI_API_KEY=*** "
            "OPENAI_MODEL=m-keyed"
        ]
    )
    assert_no_secrets(text)
    assert SHELL_KEY not in text


def test_without_the_export_self_built_clients_do_not_reach_it(keyed, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_MODEL", "m-keyed")
    result = keyed.runpytest_subprocess(*FAST, "--vllm-platform=keyed")
    # The shell's key and OpenAI's URL: nothing points at the platform.
    result.assert_outcomes(failed=3)
    assert "exported for code" not in _text(result)


@pytest.mark.parametrize(
    ("env", "ini", "exported"),
    [
        ({"MODAL_VLLM_EXPORT_ENV": "1"}, "", True),
        ({}, "vllm_export_env = true", True),
        ({"MODAL_VLLM_EXPORT_ENV": "0"}, "vllm_export_env = true", False),
        ({}, "vllm_export_env = false", False),
    ],
    ids=["env-on", "ini-on", "env-off-beats-ini", "ini-off"],
)
def test_env_and_ini_turn_it_on_and_off(
    pytester, endpoint_server, write_platforms, monkeypatch, env, ini, exported
) -> None:
    server = endpoint_server(model="m")
    write_platforms({"p": {"kind": "url", "base_url": server.base_url}}, ini=ini)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    pytester.makepyfile(
        test_env="import os\n\ndef test_env():\n"
        "    print('URL', os.environ.get('OPENAI_BASE_URL'))\n"
    )
    result = pytester.runpytest_subprocess(*FAST, "--vllm-platform=p", "-s")
    result.assert_outcomes(passed=1)
    assert (f"URL {server.base_url}" in result.stdout.str()) is exported
    assert ("exported for code" in result.stdout.str()) is exported


def test_the_variables_are_put_back_after_the_session(keyed, monkeypatch) -> None:
    before = {
        k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "OPENAI_API_BASE", "OPENAI_API_KEY")
    }
    keyed.makepyfile(
        test_self_built="import os\n\ndef test_set():\n"
        "    assert os.environ['OPENAI_API_KEY'] != 'sk-shell-openai-5d7e'\n"
        "    assert os.environ['OPENAI_BASE_URL'].startswith('http://127.0.0.1:')\n"
    )
    result = keyed.runpytest_inprocess(*FAST, "--vllm-platform=keyed", "--vllm-export-env")
    result.assert_outcomes(passed=1)
    after = {k: os.environ.get(k) for k in before}
    assert after == before  # set ones restored, unset ones unset again
    assert "OPENAI_MODEL" not in os.environ


def test_no_key_exports_a_placeholder_never_the_shell_key(
    pytester, endpoint_server, write_platforms, monkeypatch
) -> None:
    server = endpoint_server(model="open")
    write_platforms({"open": {"kind": "url", "base_url": server.base_url}})
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SHELL_KEY)
    pytester.makepyfile(
        test_key="import os\n\ndef test_key():\n"
        "    assert os.environ['OPENAI_API_KEY'] == 'no-key-set'\n"
    )
    result = pytester.runpytest_subprocess(*FAST, "--vllm-platform=open", "--vllm-export-env")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*OPENAI_API_KEY=no-key-set (no key set for open)*"])
    assert SHELL_KEY not in _text(result)


def test_several_platforms_stop_with_exit_4_before_anything_starts(
    pytester, endpoint_server, write_platforms
) -> None:
    server = endpoint_server(model="m")
    write_platforms({"p": {"kind": "url", "base_url": server.base_url}})
    pytester.makepyfile(test_x="def test_x(vllm_endpoint):\n    pass\n")
    result = pytester.runpytest_subprocess(*FAST, "--vllm-platform=p,stub", "--vllm-export-env")
    assert result.ret == 4
    text = _text(result)
    assert "2 platforms are selected (p, stub)" in text
    assert "Fix: select one platform per run" in text
    assert "current_endpoint()" in text
    assert "Traceback" not in text
    assert server.stats.requests.get("/health", 0) == 0  # nothing was woken


# ---------------------------------------------------------------------------- the setting


@pytest.mark.parametrize(
    ("cli", "env", "ini", "value", "source"),
    [
        (True, "0", "false", True, "command line"),
        (False, "yes", "false", True, "env MODAL_VLLM_EXPORT_ENV"),
        (False, "off", True, False, "env MODAL_VLLM_EXPORT_ENV"),
        (False, None, True, True, "ini vllm_export_env"),  # a TOML boolean
        (False, None, "On", True, "ini vllm_export_env"),
        (False, "", "", False, "default"),
        (False, None, None, False, "default"),
    ],
)
def test_export_env_precedence(cli, env, ini, value, source) -> None:
    settings = resolve(
        {"export_env": cli},
        {"vllm_export_env": ini},
        {"MODAL_VLLM_EXPORT_ENV": env} if env is not None else {},
    )
    assert (settings["export_env"], settings.sources["export_env"]) == (value, source)


@pytest.mark.parametrize("where", ["env", "ini"])
def test_a_bad_export_env_value_names_the_fix(where) -> None:
    env = {"MODAL_VLLM_EXPORT_ENV": "maybe"} if where == "env" else {}
    ini = {"vllm_export_env": "maybe"} if where == "ini" else {}
    with pytest.raises(ConfigError) as raised:
        resolve({}, ini, env)
    assert "'maybe' is not one of 1, 0, true, false" in str(raised.value)
    assert "Fix: set it to 1 or 0 (or true/false)." in str(raised.value)


def test_env_export_restores_exactly_what_it_changed() -> None:
    environ = {"OPENAI_API_KEY": "sk-theirs", "OTHER": "x"}
    endpoint = Endpoint(platform="p", base_url="http://h/v1", model="m", api_key="sk-ours")
    exported = EnvExport(endpoint, "command line", environ)
    exported.apply()
    assert environ == {
        "OPENAI_API_KEY": "sk-ours",
        "OPENAI_BASE_URL": "http://h/v1",
        "OPENAI_API_BASE": "http://h/v1",
        "OPENAI_MODEL": "m",
        "OTHER": "x",
    }
    assert "sk-ours" not in exported.header_line()
    exported.restore()
    exported.restore()  # idempotent
    assert environ == {"OPENAI_API_KEY": "sk-theirs", "OTHER": "x"}
