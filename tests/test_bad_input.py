"""The bad-input matrix: every way a user can misconfigure the plugin, through its public surface.

Each case writes a small pytester project (pyproject.toml, a `--vllm-config` file, `.env`, a stub
script), sets environment variables and command-line options, runs pytest in a subprocess (so
exit codes and stderr are real) and checks: the documented exit code (4 configuration error,
75 not ready), a message that names the platform, the problem and the fix, no traceback, and
nothing left running afterwards.

`BAD_INPUTS` is importable (`from test_bad_input import BAD_INPUTS`) for the docs: each entry
has `id`, `where` (the kind of input), `exit_code` and `message` (a fragment of what the user
sees).

Placeholders in files, args and env values: `@URL@` / `@ROOT@` the base / root URL of a live
fake endpoint (`server=` switches), `@DEAD@` a base URL on a port nothing listens on, `@PY@` this
Python, `@TOKEN@` a unique marker put on any command line a case starts (to find leftovers).
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, FAST, PROXY_KEY, PROXY_SECRET, assert_no_secrets, processes_with

EXIT_CONFIG = 4
EXIT_UNAVAILABLE = 75

WRONG_KEY = "sk-wrong-0c9e1d"


@dataclass(frozen=True)
class BadInput:
    """One row of the matrix."""

    id: str
    #: Where the bad input lives: pyproject.toml, config file, command line, environment, ini,
    #: .env file, ${VAR}, endpoint, process command, stub script.
    where: str
    exit_code: int
    #: A fragment of the message the user sees.
    message: str
    files: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    #: The platform the paragraph must name (`vllm platform 'NAME'`), when there is one.
    platform: str | None = None
    #: Further fragments that must appear.
    also: tuple[str, ...] = ()
    #: The paragraph carries "Fix:" (False for errors worded by pytest or argparse themselves).
    fix: bool = True
    #: Start a fake endpoint with these `Behaviour` switches (for `@URL@` / `@ROOT@`).
    server: Mapping[str, Any] | None = None


def pyproject(name: str = "", body: str = "", ini: str = "") -> dict[str, str]:
    """A pyproject.toml with one platform table and/or pytest ini options."""
    text = f"[tool.pytest.ini_options]\n{ini}\n\n" if ini else ""
    if name:
        text += f"[tool.modal-vllm.platforms.{name}]\n{body}\n"
    return {"pyproject.toml": text}


URL_OK = 'kind = "url"\nbase_url = "http://127.0.0.1:9/v1"\n'
STUB = ("--vllm-platform=stub",)

# fmt: off
BAD_INPUTS: list[BadInput] = [
    # ------------------------------------------------------------------ pyproject.toml
    BadInput("unknown-platform", "command line", EXIT_CONFIG,
             "unknown platform 'stbu' (did you mean 'stub'?)", args=("--vllm-platform=stbu",),
             also=("[tool.modal-vllm.platforms.stbu]",)),
    BadInput("unknown-field", "pyproject.toml", EXIT_CONFIG,
             "unknown field 'comand' (did you mean 'command'?) in pyproject.toml",
             pyproject("gpu", URL_OK + 'comand = ["x"]'), ("--vllm-platform=gpu",),
             platform="gpu", also=("valid fields for kind 'url'",)),
    BadInput("field-of-another-kind", "pyproject.toml", EXIT_CONFIG,
             "field 'command' does not apply to kind 'url'",
             pyproject("gpu", URL_OK + 'command = ["vllm", "serve"]'), ("--vllm-platform=gpu",),
             platform="gpu", also=("it is for kind 'process'",)),
    BadInput("wrong-type", "pyproject.toml", EXIT_CONFIG,
             "field 'wake_timeout' must be a number, got 'abc'",
             pyproject("gpu", URL_OK + 'wake_timeout = "abc"'), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("bool-for-number", "pyproject.toml", EXIT_CONFIG,
             "field 'keep_alive_interval' must be a number, got True",
             pyproject("gpu", URL_OK + "keep_alive_interval = true"), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("zero-wake-timeout", "pyproject.toml", EXIT_CONFIG,
             "field 'wake_timeout' must be a positive number of seconds, got 0",
             pyproject("gpu", URL_OK + "wake_timeout = 0"), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("missing-kind", "pyproject.toml", EXIT_CONFIG, "no 'kind' in pyproject.toml",
             pyproject("gpu", 'base_url = "http://127.0.0.1:9/v1"'), ("--vllm-platform=gpu",),
             platform="gpu", also=("add kind =",)),
    BadInput("unknown-kind", "pyproject.toml", EXIT_CONFIG,
             "unknown kind 'urll' (did you mean 'url'?)",
             pyproject("gpu", 'kind = "urll"'), ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("missing-base-url", "pyproject.toml", EXIT_CONFIG,
             "kind 'url' needs field 'base_url'",
             pyproject("gpu", 'kind = "url"'), ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("base-url-not-v1", "pyproject.toml", EXIT_CONFIG,
             "base_url 'http://127.0.0.1:9/api' does not end in /v1",
             pyproject("gpu", 'kind = "url"\nbase_url = "http://127.0.0.1:9/api"'),
             ("--vllm-platform=gpu",), platform="gpu", also=("http://127.0.0.1:9/api/v1",)),
    BadInput("base-url-not-http", "pyproject.toml", EXIT_CONFIG,
             "base_url 'ftp://llm.example/v1' is not an http(s) URL",
             pyproject("gpu", 'kind = "url"\nbase_url = "ftp://llm.example/v1"'),
             ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("keep-alive-invalid", "pyproject.toml", EXIT_CONFIG,
             "keep_alive 'pingg' (did you mean 'ping'?) is not a mode",
             pyproject("gpu", URL_OK + 'keep_alive = "pingg"'), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("keep-alive-autoscaler-on-url", "pyproject.toml", EXIT_CONFIG,
             "keep_alive 'autoscaler' needs kind 'modal'",
             pyproject("gpu", URL_OK + 'keep_alive = "autoscaler"'), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("unknown-client-option", "pyproject.toml", EXIT_CONFIG,
             "unknown client option 'timout' (did you mean 'timeout'?)",
             pyproject("gpu", URL_OK + "client = { timout = 5 }"), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("modal-function-and-server", "pyproject.toml", EXIT_CONFIG,
             "both 'function' and 'server' are set",
             pyproject("gpu", 'kind = "modal"\napp = "a"\nfunction = "f"\nserver = "s"'),
             ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("modal-missing-app", "pyproject.toml", EXIT_CONFIG, "kind 'modal' needs field 'app'",
             pyproject("gpu", 'kind = "modal"'), ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("proxy-auth-not-bool", "pyproject.toml", EXIT_CONFIG,
             "field 'proxy_auth' must be true or false, got 'yes'",
             pyproject("gpu", 'kind = "modal"\napp = "a"\nproxy_auth = "yes"'),
             ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("capabilities-not-strings", "pyproject.toml", EXIT_CONFIG,
             "field 'capabilities' must be a list of strings",
             pyproject("gpu", URL_OK + "capabilities = [1, 2]"), ("--vllm-platform=gpu",),
             platform="gpu"),
    BadInput("platform-not-a-table", "pyproject.toml", EXIT_CONFIG,
             "tool.modal-vllm.platforms.gpu in pyproject.toml must be a table",
             {"pyproject.toml": '[tool.modal-vllm.platforms]\ngpu = "url"\n'},
             ("--vllm-platform=gpu",), platform="gpu"),
    BadInput("unknown-section", "pyproject.toml", EXIT_CONFIG,
             "unknown key [tool.modal-vllm.platform] in pyproject.toml (did you mean "
             "'platforms'?)",
             {"pyproject.toml": "[tool.modal-vllm.platform.gpu]\n" + URL_OK},
             ("--vllm-platform=gpu",)),
    BadInput("invalid-toml-pyproject", "pyproject.toml", EXIT_CONFIG,
             "pyproject.toml: Expected ']'",
             {"pyproject.toml": '[tool.modal-vllm.platforms.gpu\nkind = "url"\n'},
             ("--vllm-platform=gpu",), fix=False),
    # ------------------------------------------------------------------ --vllm-config file
    BadInput("config-file-missing", "config file", EXIT_CONFIG,
             "platform file", args=("--vllm-config=missing.toml", *STUB),
             also=("missing.toml", "does not exist")),
    BadInput("config-file-unknown-top-level-key", "config file", EXIT_CONFIG,
             "unknown top-level key 'platform' in extra.toml (did you mean 'platforms'?)",
             {"extra.toml": "[platform.gpu]\n" + URL_OK}, ("--vllm-config=extra.toml", *STUB)),
    BadInput("config-file-invalid-toml", "config file", EXIT_CONFIG, "is not valid TOML",
             {"extra.toml": "[platforms.gpu\n"}, ("--vllm-config=extra.toml", *STUB),
             also=("extra.toml",)),
    BadInput("config-file-unknown-field", "config file", EXIT_CONFIG,
             "unknown field 'modle' (did you mean 'model'?) in extra.toml",
             {"extra.toml": "[platforms.gpu]\n" + URL_OK + 'modle = "m"\n'},
             ("--vllm-config=extra.toml", "--vllm-platform=gpu"), platform="gpu"),
    BadInput("config-file-platforms-not-tables", "config file", EXIT_CONFIG,
             "platforms in extra.toml must be a table of platform tables",
             {"extra.toml": 'platforms = "gpu"\n'}, ("--vllm-config=extra.toml", *STUB)),
    # ------------------------------------------------------------------ command line
    BadInput("cli-wake-timeout-negative", "command line", EXIT_CONFIG,
             "argument --vllm-wake-timeout: '-1' must be a positive number of seconds",
             args=("--vllm-wake-timeout", "-1", *STUB), fix=False),
    BadInput("cli-wake-timeout-not-a-number", "command line", EXIT_CONFIG,
             "argument --vllm-wake-timeout: 'abc' is not a number of seconds",
             args=("--vllm-wake-timeout=abc", *STUB), fix=False),
    BadInput("cli-keep-alive-invalid", "command line", EXIT_CONFIG,
             "argument --vllm-keep-alive: invalid choice: 'sometimes'",
             args=("--vllm-keep-alive=sometimes", *STUB), fix=False),
    BadInput("cli-unavailable-invalid", "command line", EXIT_CONFIG,
             "argument --vllm-unavailable: invalid choice: 'maybe'",
             args=("--vllm-unavailable=maybe", *STUB), fix=False),
    BadInput("cli-keep-alive-autoscaler-on-stub", "command line", EXIT_CONFIG,
             "keep-alive 'autoscaler' (command line) needs a modal platform",
             args=("--vllm-keep-alive=autoscaler", *STUB), platform="stub"),
    # ------------------------------------------------------------------ environment
    BadInput("env-wake-timeout-not-a-number", "environment", EXIT_CONFIG,
             "environment variable MODAL_VLLM_WAKE_TIMEOUT: 'abc' is not a number of seconds",
             env={"MODAL_VLLM_WAKE_TIMEOUT": "abc"}),
    BadInput("env-wake-timeout-zero", "environment", EXIT_CONFIG,
             "MODAL_VLLM_WAKE_TIMEOUT: '0' must be a positive number of seconds",
             env={"MODAL_VLLM_WAKE_TIMEOUT": "0"}),
    BadInput("env-unavailable-invalid", "environment", EXIT_CONFIG,
             "environment variable MODAL_VLLM_UNAVAILABLE is 'maybe', which is not one of "
             "fail, skip", env={"MODAL_VLLM_UNAVAILABLE": "maybe"}),
    BadInput("env-keep-alive-invalid", "environment", EXIT_CONFIG,
             "environment variable MODAL_VLLM_KEEP_ALIVE is 'sometimes'",
             env={"MODAL_VLLM_KEEP_ALIVE": "sometimes"}, also=("ping, autoscaler, off",)),
    BadInput("env-unknown-platform", "environment", EXIT_CONFIG,
             "unknown platform 'locl' (did you mean 'local'?)",
             env={"MODAL_VLLM_PLATFORM": "stub,locl"}),
    BadInput("env-config-missing", "environment", EXIT_CONFIG, "does not exist",
             env={"MODAL_VLLM_CONFIG": "gone.toml", "MODAL_VLLM_PLATFORM": "stub"},
             also=("gone.toml",)),
    BadInput("env-keep-alive-autoscaler-on-stub", "environment", EXIT_CONFIG,
             "keep-alive 'autoscaler' (env MODAL_VLLM_KEEP_ALIVE) needs a modal platform",
             env={"MODAL_VLLM_KEEP_ALIVE": "autoscaler"}, args=STUB, platform="stub"),
    # ------------------------------------------------------------------ ini
    BadInput("ini-unavailable-invalid", "ini", EXIT_CONFIG,
             "ini vllm_unavailable is 'nope', which is not one of fail, skip",
             pyproject(ini='vllm_unavailable = "nope"')),
    BadInput("ini-wake-timeout-negative", "ini", EXIT_CONFIG,
             "ini vllm_wake_timeout: '-5' must be a positive number of seconds",
             pyproject(ini='vllm_wake_timeout = "-5"')),
    BadInput("ini-keep-alive-invalid", "ini", EXIT_CONFIG, "ini vllm_keep_alive is 'always'",
             pyproject(ini='vllm_keep_alive = "always"')),
    BadInput("ini-value-is-a-list", "ini", EXIT_CONFIG,
             "ini vllm_wake_timeout is a list", pyproject(ini='vllm_wake_timeout = ["5"]')),
    BadInput("ini-unknown-platform", "ini", EXIT_CONFIG, "unknown platform 'stbu'",
             pyproject(ini='vllm_platform = "stbu"')),
    BadInput("ini-config-missing", "ini", EXIT_CONFIG, "does not exist",
             pyproject(ini='vllm_config = "gone.toml"'), STUB, also=("gone.toml",)),
    # ------------------------------------------------------------------ .env
    BadInput("env-file-missing", ".env file", EXIT_CONFIG,
             "the env file 'missing.env' does not exist", args=("--vllm-env-file=missing.env",),
             also=("--vllm-env-file",)),
    BadInput("env-file-missing-from-environment", ".env file", EXIT_CONFIG,
             "the env file 'gone.env' does not exist", env={"MODAL_VLLM_ENV_FILE": "gone.env"}),
    BadInput("env-file-missing-from-ini", ".env file", EXIT_CONFIG,
             "the env file 'gone.env' does not exist", pyproject(ini='vllm_env_file = "gone.env"')),
    BadInput("env-file-bad-unavailable", ".env file", EXIT_CONFIG,
             "MODAL_VLLM_UNAVAILABLE is 'maybe'",
             {"ci.env": "MODAL_VLLM_UNAVAILABLE=maybe\n"}, ("--vllm-env-file=ci.env",)),
    BadInput("default-env-file-unknown-platform", ".env file", EXIT_CONFIG,
             "unknown platform 'stbu' (did you mean 'stub'?)",
             {".env": "MODAL_VLLM_PLATFORM=stbu\n"}),
    BadInput("env-file-empty-api-url", ".env file", EXIT_CONFIG,
             "base_url '${VLLM_API_URL}' expands to an empty string",
             {"ci.env": "VLLM_API_URL=\n"}, ("--vllm-env-file=ci.env", "--vllm-platform=env"),
             platform="env"),
    # ------------------------------------------------------------------ ${VAR}
    BadInput("var-unset-in-base-url", "${VAR}", EXIT_CONFIG,
             "field 'base_url' uses ${MY_LLM_URL}, but MY_LLM_URL is not set",
             pyproject("gpu", 'kind = "url"\nbase_url = "${MY_LLM_URL}"'),
             ("--vllm-platform=gpu",), platform="gpu", also=("export MY_LLM_URL=",)),
    BadInput("var-unset-env-platform", "${VAR}", EXIT_CONFIG,
             "uses ${VLLM_API_URL}, but VLLM_API_URL is not set", args=("--vllm-platform=env",),
             platform="env"),
    BadInput("var-empty-env-platform", "${VAR}", EXIT_CONFIG, "expands to an empty string",
             args=("--vllm-platform=env",), env={"VLLM_API_URL": ""}, platform="env"),
    BadInput("var-expands-to-non-url", "${VAR}", EXIT_CONFIG,
             "base_url 'localhost:8000/v1' is not an http(s) URL after expanding",
             pyproject("gpu", 'kind = "url"\nbase_url = "${MY_LLM_URL}"'),
             ("--vllm-platform=gpu",), {"MY_LLM_URL": "localhost:8000/v1"}, platform="gpu"),
    BadInput("var-expands-to-url-without-v1", "${VAR}", EXIT_CONFIG, "does not end in /v1",
             args=("--vllm-platform=env",), env={"VLLM_API_URL": "http://127.0.0.1:9/api"},
             platform="env"),
    BadInput("var-unset-in-process-env", "${VAR}", EXIT_CONFIG,
             "field 'env.HF_TOKEN' uses ${MY_HF_TOKEN}, but MY_HF_TOKEN is not set",
             pyproject("srv", 'kind = "process"\ncommand = ["@PY@", "-c", "pass", "@TOKEN@"]\n'
                       'env = { HF_TOKEN = "${MY_HF_TOKEN}" }'),
             ("--vllm-platform=srv",), platform="srv"),
    # ------------------------------------------------------------------ endpoint answers
    BadInput("wrong-api-key", "endpoint", EXIT_CONFIG,
             "answered 401: the key in VLLM_API_KEY was rejected",
             pyproject("gpu", 'kind = "url"\nbase_url = "@URL@"'), ("--vllm-platform=gpu",),
             {"VLLM_API_KEY": WRONG_KEY}, platform="gpu", server={"api_key": API_KEY}),
    BadInput("missing-api-key", "endpoint", EXIT_CONFIG,
             "no API key was sent because MY_KEY is not set",
             pyproject("gpu", 'kind = "url"\nbase_url = "@URL@"\napi_key_env = "MY_KEY"'),
             ("--vllm-platform=gpu",), platform="gpu", server={"api_key": API_KEY},
             also=("export MY_KEY=",)),
    BadInput("proxy-auth-missing", "endpoint", EXIT_CONFIG, "Modal proxy auth is required",
             pyproject("gpu", 'kind = "url"\nbase_url = "@URL@"'), ("--vllm-platform=gpu",),
             platform="gpu", server={"proxy_auth": (PROXY_KEY, PROXY_SECRET)}),
    BadInput("wrong-base-url-404", "endpoint", EXIT_CONFIG,
             "GET /v1/models answered 404: the base URL does not point at an "
             "OpenAI-compatible API",
             pyproject("gpu", 'kind = "url"\nbase_url = "@ROOT@/wrong/v1"'),
             ("--vllm-platform=gpu",), platform="gpu", server={}, also=("/wrong/v1",)),
    BadInput("model-not-served", "endpoint", EXIT_CONFIG,
             "model 'llama-9000' is not served", pyproject(
                 "gpu", 'kind = "url"\nbase_url = "@URL@"\nmodel = "llama-9000"'),
             ("--vllm-platform=gpu",), platform="gpu", server={}, also=("it serves: stub",)),
    BadInput("never-ready", "endpoint", EXIT_UNAVAILABLE, "did not become ready within 1s",
             pyproject("gpu", 'kind = "url"\nbase_url = "@URL@"\nwake_timeout = 1'),
             ("--vllm-platform=gpu",), platform="gpu",
             server={"cold_start": 3600, "cold_style": "503"}, also=("503",)),
    BadInput("connection-refused", "endpoint", EXIT_UNAVAILABLE,
             "(last answer: connection refused)",
             pyproject("gpu", 'kind = "url"\nbase_url = "@DEAD@"'),
             ("--vllm-platform=gpu", "--vllm-wake-timeout=1"), platform="gpu"),
    BadInput("host-does-not-resolve", "endpoint", EXIT_UNAVAILABLE,
             "the host name does not resolve",
             pyproject("gpu", 'kind = "url"\nbase_url = "http://nonexistent.invalid/v1"'),
             ("--vllm-platform=gpu",), platform="gpu", also=("check the host in the URL",)),
    # ------------------------------------------------------------------ process command
    BadInput("process-command-not-found", "process command", EXIT_CONFIG,
             "cannot start 'no-such-server-",
             pyproject("srv", 'kind = "process"\ncommand = ["no-such-server-@TOKEN@", "{port}"]'),
             ("--vllm-platform=srv",), platform="srv", also=("on PATH",)),
    BadInput("process-model-placeholder-without-model", "process command", EXIT_CONFIG,
             "the command uses {model} but the platform has no model",
             pyproject("srv", 'kind = "process"\ncommand = ["@PY@", "{model}", "@TOKEN@"]'),
             ("--vllm-platform=srv",), platform="srv"),
    BadInput("process-exits-at-once", "process command", EXIT_UNAVAILABLE,
             "the server process died while waking: exit code 3",
             pyproject("srv", 'kind = "process"\n'
                       'command = ["@PY@", "-c", "raise SystemExit(3)", "@TOKEN@"]'),
             ("--vllm-platform=srv",), platform="srv"),
    BadInput("process-never-ready", "process command", EXIT_UNAVAILABLE,
             "did not become ready within 1s",
             pyproject("srv", 'kind = "process"\nwake_timeout = 1\n'
                       'command = ["@PY@", "-c", "import time; time.sleep(60)", "@TOKEN@"]'),
             ("--vllm-platform=srv",), platform="srv"),
    # ------------------------------------------------------------------ stub script
    BadInput("stub-script-missing", "stub script", EXIT_CONFIG, "bad stub script",
             pyproject("fake", 'kind = "stub"\nscript = "rules.toml"'), ("--vllm-platform=fake",),
             platform="fake", also=("rules.toml: file not found",)),
    BadInput("stub-script-invalid-toml", "stub script", EXIT_CONFIG, "invalid TOML",
             {**pyproject("fake", 'kind = "stub"\nscript = "rules.toml"'),
              "rules.toml": "[[rules]\nreply = 1\n"}, ("--vllm-platform=fake",),
             platform="fake", also=("bad stub script",)),
    BadInput("stub-script-bad-rule", "stub script", EXIT_CONFIG,
             "has neither 'reply' nor 'tool_call'",
             {**pyproject("fake", 'kind = "stub"\nscript = "rules.toml"'),
              "rules.toml": '[[rules]]\nmatch = "hi"\n'}, ("--vllm-platform=fake",),
             platform="fake"),
    BadInput("stub-negative-cold-start", "pyproject.toml", EXIT_CONFIG,
             "field 'cold_start' must be 0 or more seconds",
             pyproject("fake", 'kind = "stub"\ncold_start = -1'), ("--vllm-platform=fake",),
             platform="fake"),
    # ------------------------------------------------------------------ this wave's settings
    BadInput("replay-without-recordings", "command line", EXIT_CONFIG,
             "--record-mode=none replays cassettes, but none was recorded on this platform",
             args=("--vllm-platform=stub", "--record-mode=none"), platform="stub",
             also=("pytest --vllm-platform=stub --record-mode=once",)),
    BadInput("fast-scaledown-not-bool", "pyproject.toml", EXIT_CONFIG,
             "field 'fast_scaledown' must be true or false",
             pyproject("m", 'kind = "modal"\napp = "a"\nfast_scaledown = "no"'),
             ("--vllm-platform=m",), platform="m"),
    BadInput("snapshot-on-a-url-platform", "pyproject.toml", EXIT_CONFIG,
             "field 'snapshot' does not apply to kind 'url'",
             pyproject("gpu", URL_OK + "snapshot = true"), ("--vllm-platform=gpu",),
             platform="gpu"),
    # ------------------------------------------------------------------ the rootdir trap
    BadInput("option-value-after-a-space", "command line", EXIT_CONFIG,
             "`--vllm-config other/platforms.toml` is written with a space",
             {"other/pyproject.toml": "[tool.pytest.ini_options]\n",
              "other/platforms.toml": '[platforms.x]\nkind = "stub"\n'},
             ("--vllm-config", "other/platforms.toml", "--vllm-platform=x"),
             also=("Fix: write --vllm-config=other/platforms.toml (with '=')",)),
    # ------------------------------------------------------------------ --vllm-export-env
    BadInput("export-env-several-platforms", "command line", EXIT_CONFIG,
             "2 platforms are selected (stub, local)",
             args=("--vllm-platform=stub,local", "--vllm-export-env"),
             also=("current_endpoint()",)),
    BadInput("env-export-env-invalid", "environment", EXIT_CONFIG,
             "environment variable MODAL_VLLM_EXPORT_ENV: 'maybe' is not one of 1, 0",
             args=STUB, env={"MODAL_VLLM_EXPORT_ENV": "maybe"}),
]
# fmt: on


# ---------------------------------------------------------------------------- leftovers


def _children(pid: int) -> set[int]:
    """The direct child processes of `pid` (psutil-free: /proc/PID/task/*/children)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def _non_daemon_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if not t.daemon}


# ---------------------------------------------------------------------------- the matrix


def test_matrix_is_well_formed() -> None:
    ids = [case.id for case in BAD_INPUTS]
    assert len(ids) == len(set(ids)) >= 25
    assert {case.exit_code for case in BAD_INPUTS} == {EXIT_CONFIG, EXIT_UNAVAILABLE}
    assert {case.where for case in BAD_INPUTS} >= {
        "pyproject.toml",
        "config file",
        "command line",
        "environment",
        "ini",
        ".env file",
        "${VAR}",
        "endpoint",
    }


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input(
    case: BadInput,
    pytester: pytest.Pytester,
    endpoint_server: Any,
    monkeypatch: pytest.MonkeyPatch,
    refused_url: str,
) -> None:
    token = f"vllm-bad-input-{uuid.uuid4().hex[:12]}"
    subs = {"@PY@": sys.executable, "@TOKEN@": token, "@DEAD@": refused_url}
    if case.server is not None:
        server = endpoint_server(**case.server)
        subs.update({"@URL@": server.base_url, "@ROOT@": server.root_url})

    def fill(text: str) -> str:
        for placeholder, value in subs.items():
            text = text.replace(placeholder, value)
        return text

    for name, text in case.files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fill(text))
    for name, value in case.env.items():
        monkeypatch.setenv(name, fill(value))
    pytester.makepyfile(test_bad="def test_llm(vllm_endpoint):\n    pass\n")

    children_before = _children(os.getpid())
    threads_before = _non_daemon_threads()
    result = pytester.runpytest_subprocess(*FAST, *(fill(a) for a in case.args), timeout=60)
    text = result.stdout.str() + "\n" + result.stderr.str()

    assert result.ret == case.exit_code, text
    for fragment in (case.message, *case.also):
        assert fragment in text, f"{fragment!r} not in:\n{text}"
    if case.platform is not None:
        assert f"vllm platform '{case.platform}'" in text, text
    if case.fix:
        assert "Fix:" in text, text
    assert "Traceback" not in text, text
    assert "INTERNALERROR" not in text, text
    assert "1 passed" not in text  # the session stopped before any test ran
    assert_no_secrets(text)
    assert WRONG_KEY not in text
    # Nothing left running: no child of this process, nothing started with the case's token,
    # no new non-daemon thread here.
    assert _children(os.getpid()) <= children_before
    assert processes_with(token) == []
    assert _non_daemon_threads() <= threads_before


@pytest.mark.parametrize(
    ("env", "ini"),
    [
        ({"MODAL_VLLM_WAKE_TIMEOUT": "abc"}, ""),
        ({"MODAL_VLLM_ENV_FILE": "missing.env"}, ""),
        ({}, "vllm_keep_alive = forever\n"),
    ],
    ids=["bad-env-value", "missing-env-file", "bad-ini-value"],
)
def test_help_and_version_work_whatever_the_environment_holds(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], ini: str
) -> None:
    """`--help` and `--version` answer; the same settings still stop a real run with exit 4."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makeini("[pytest]\n" + ini)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    shown = pytester.runpytest_subprocess(*FAST, "--help")
    assert shown.ret == 0, shown.stderr.str()
    shown.stdout.fnmatch_lines(["*--vllm-platform=NAME*", "*--vllm-wake-timeout=SECONDS*"])
    version = pytester.runpytest_subprocess(*FAST, "--version")
    assert version.ret == 0, version.stderr.str()
    run = pytester.runpytest_subprocess(*FAST)
    assert run.ret == 4
    assert "Traceback" not in run.stderr.str()
