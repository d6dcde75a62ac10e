"""The one resolution step: `${VAR}` expanded once, every default applied, each with its source.

Also the regression of the bug it removed: a `process` platform with `model = "${VAR}"` used to
start its server with the literal text while the wake used the expanded model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, stub_command

from pytest_modal_vllm.errors import ConfigError
from pytest_modal_vllm.modal_sdk import ModalTarget, bundled_app_file
from pytest_modal_vllm.platforms import Platform, builtin_platforms
from pytest_modal_vllm.resolution import (
    ClientOptions,
    Setting,
    expand,
    resolve_platform,
)
from pytest_modal_vllm.settings import resolve


def settings(cli: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    return resolve(cli or {}, kwargs.get("ini", {}), kwargs.get("env", {}))


def url_platform(**fields: Any) -> Platform:
    fields.setdefault("kind", "url")
    fields.setdefault("base_url", "http://127.0.0.1:9/v1")
    return Platform(name="gpu", **fields)


def error_of(call: Any, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------- precedence


def test_kind_defaults_apply_when_nothing_else_is_set() -> None:
    resolved = resolve_platform(url_platform(), settings(), {})
    assert resolved.wake_timeout == Setting(600.0, "url default")
    assert resolved.keep_alive == Setting("off", "url default")
    for platform, timeout, keep_alive in (
        (Platform(name="m", kind="modal", app="a"), 900.0, "ping"),
        (Platform(name="s", kind="stub"), 30.0, "off"),
        (Platform(name="p", kind="process", command=("x",)), 300.0, "off"),
    ):
        resolved = resolve_platform(platform, settings(), {})
        assert resolved.wake_timeout.value == timeout
        assert resolved.keep_alive.value == keep_alive
        assert resolved.wake_timeout.source == f"{platform.kind} default"


def test_the_platform_field_beats_the_kind_default() -> None:
    resolved = resolve_platform(url_platform(wake_timeout=42, keep_alive="ping"), settings(), {})
    assert resolved.wake_timeout == Setting(42.0, "platform gpu")
    assert resolved.keep_alive == Setting("ping", "platform gpu")


@pytest.mark.parametrize(
    ("cli", "env", "ini", "expected"),
    [
        (
            {"wake_timeout": 5.0, "keep_alive": "off"},
            {},
            {},
            {"wake_timeout": (5.0, "command line"), "keep_alive": ("off", "command line")},
        ),
        (
            {},
            {"MODAL_VLLM_WAKE_TIMEOUT": "6", "MODAL_VLLM_KEEP_ALIVE": "off"},
            {},
            {
                "wake_timeout": (6.0, "env MODAL_VLLM_WAKE_TIMEOUT"),
                "keep_alive": ("off", "env MODAL_VLLM_KEEP_ALIVE"),
            },
        ),
        (
            {},
            {},
            {"vllm_wake_timeout": "7", "vllm_keep_alive": "off"},
            {
                "wake_timeout": (7.0, "ini vllm_wake_timeout"),
                "keep_alive": ("off", "ini vllm_keep_alive"),
            },
        ),
        (
            {"wake_timeout": 5.0},
            {},
            {"vllm_keep_alive": "off"},
            {"wake_timeout": (5.0, "command line"), "keep_alive": ("off", "ini vllm_keep_alive")},
        ),
    ],
)
def test_run_wide_options_beat_the_platform_field(cli, env, ini, expected) -> None:
    platform = url_platform(wake_timeout=42.0, keep_alive="ping")
    resolved = resolve_platform(platform, settings(cli, ini=ini, env=env), {})
    assert {
        "wake_timeout": (resolved.wake_timeout.value, resolved.wake_timeout.source),
        "keep_alive": (resolved.keep_alive.value, resolved.keep_alive.source),
    } == expected


def test_autoscaler_keep_alive_needs_a_modal_platform() -> None:
    error = error_of(resolve_platform, url_platform(), settings({"keep_alive": "autoscaler"}), {})
    assert "keep-alive 'autoscaler' (command line) needs a modal platform" in str(error)


# ---------------------------------------------------------------------------- ${VAR}


@pytest.mark.parametrize(
    ("text", "env", "expanded"),
    [
        ("${HOST}/v1", {"HOST": "http://h"}, "http://h/v1"),
        ("${A}-${B}", {"A": "1", "B": "2"}, "1-2"),
        ("${PORT:-8000}", {}, "8000"),
        ("${PORT:-8000}", {"PORT": "9"}, "9"),
        ("${PORT:-8000}", {"PORT": ""}, "8000"),  # as in the shell: empty uses the default
        ("${MODEL:-}", {}, ""),
        ("${SET_EMPTY}", {"SET_EMPTY": ""}, ""),
        ("$HOST and {HOST}", {}, "$HOST and {HOST}"),
        ("plain", {}, "plain"),
    ],
)
def test_expand(text: str, env: dict[str, str], expanded: str) -> None:
    assert expand("p", "base_url", text, env) == expanded


def test_expand_unset_variable_names_field_variable_and_fix() -> None:
    error = error_of(expand, "gpu", "base_url", "${NOPE_URL}/v1", {})
    assert str(error) == (
        "vllm platform 'gpu': field 'base_url' uses ${NOPE_URL}, but NOPE_URL is not set. "
        "Fix: export NOPE_URL=... or put it in .env."
    )


def test_expand_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_MODAL_VLLM_TEST_HOST", "http://x")
    assert expand("p", "base_url", "${PYTEST_MODAL_VLLM_TEST_HOST}/v1") == "http://x/v1"


def test_every_variable_is_expanded_once_in_the_resolved_value() -> None:
    env = {"HOST": "http://h:1", "MODEL": "m-1", "KEY": "sk-x", "OPT": "on"}
    url = resolve_platform(
        url_platform(base_url="${HOST}", model="${MODEL}", api_key_env="KEY"), settings(), env
    )
    assert (url.base_url, url.model, url.api_key) == ("http://h:1/v1", "m-1", "sk-x")
    process = resolve_platform(
        Platform(
            name="p",
            kind="process",
            model="${MODEL}",
            command=("serve", "{model}", "--port", "{port}"),
            env={"FLAG": "${OPT}"},
        ),
        settings(),
        env,
    )
    # {model} is the expanded model; {port} and {host} are left for the provider.
    assert process.command == ("serve", "m-1", "--port", "{port}")
    assert process.env == {"FLAG": "on"}
    assert process.model == "m-1"


def test_the_env_builtin_model_is_optional() -> None:
    env = builtin_platforms()["env"]
    base = {"VLLM_API_URL": "http://h/v1"}
    assert resolve_platform(env, settings(), base).model is None
    assert resolve_platform(env, settings(), {**base, "VLLM_MODEL": "m"}).model == "m"


def test_a_base_url_expanding_to_nothing_is_a_config_error() -> None:
    error = error_of(resolve_platform, url_platform(base_url="${EMPTY}"), settings(), {"EMPTY": ""})
    assert "expands to an empty string" in str(error)


def test_a_command_with_model_needs_a_model() -> None:
    platform = Platform(name="p", kind="process", command=("serve", "{model}"))
    assert "uses {model} but the platform has no model" in str(
        error_of(resolve_platform, platform, settings(), {})
    )


# ---------------------------------------------------------------------------- kinds


def test_client_options_are_the_table_over_the_defaults() -> None:
    assert resolve_platform(url_platform(), settings(), {}).client == ClientOptions()
    resolved = resolve_platform(
        url_platform(client={"timeout": 5, "max_tokens": 64, "extra_body": {"top_k": 1}}),
        settings(),
        {},
    )
    assert resolved.client == ClientOptions(
        timeout=5.0, max_retries=3, temperature=0.0, max_tokens=64, extra_body={"top_k": 1}
    )


def test_a_modal_platform_resolves_to_one_target_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    platform = Platform(
        name="m",
        kind="modal",
        app="my-app",
        environment="dev",
        modal_app="apps/x.py",
        deploy_env={"GPU": "L4"},
    )
    resolved = resolve_platform(platform, settings({"deploy": True}), {})
    assert resolved.modal == ModalTarget("my-app", "serve", None, "dev")
    assert resolved.modal_app == tmp_path / "apps" / "x.py"
    assert resolved.deploy_env == {"GPU": "L4", "APP_NAME": "my-app"}
    assert resolved.modal_mode == "deploy"
    server = resolve_platform(Platform(name="s", kind="modal", app="a", server="S"), settings(), {})
    assert server.modal == ModalTarget("a", None, "S")
    assert server.modal_app == bundled_app_file()
    assert server.modal_mode == "locate"


def test_proxy_headers_are_required_only_when_the_endpoint_is_contacted() -> None:
    platform = Platform(name="m", kind="modal", app="a", proxy_auth=True)
    error = error_of(resolve_platform, platform, settings(), {"MODAL_PROXY_TOKEN_ID": "wk"})
    assert "MODAL_PROXY_TOKEN_SECRET" in str(error)
    assert resolve_platform(platform, settings(), {}, contact=False).headers == {}
    env = {"MODAL_PROXY_TOKEN_ID": "wk", "MODAL_PROXY_TOKEN_SECRET": "ws-secret-1"}
    resolved = resolve_platform(platform, settings(), env)
    assert resolved.headers == {"Modal-Key": "wk", "Modal-Secret": "ws-secret-1"}
    assert "ws-secret-1" not in repr(resolved)


# ---------------------------------------------------------------------------- regressions


def test_a_process_model_variable_reaches_the_server_command(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server starts with the expanded model: the stub serves exactly that model id, and
    the wake (which asks for the same model) succeeds."""
    command = ", ".join(f'"{arg}"' for arg in stub_command())
    pytester.makepyprojecttoml(
        f"""
        [tool.modal-vllm.platforms.srv]
        kind = "process"
        model = "${{MY_SERVED_MODEL}}"
        command = [{command}]
        """
    )
    pytester.makepyfile(
        """
        def test_model(vllm_endpoint, openai_client):
            assert vllm_endpoint.model == "expanded-model-7"
            assert [m.id for m in openai_client.models.list()] == ["expanded-model-7"]
        """
    )
    monkeypatch.setenv("MY_SERVED_MODEL", "expanded-model-7")
    result = pytester.runpytest_subprocess("--vllm-platform=srv", *FAST)
    result.assert_outcomes(passed=1)


def test_the_cli_resolves_ini_values_like_pytest(pytester: pytest.Pytester) -> None:
    """`modal-vllm` reads the ini file pytest would (here `vllm_config`), not only the env."""
    pytester.path.joinpath("more.toml").write_text(
        '[platforms.from-ini]\nkind = "url"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )
    pytester.makeini("[pytest]\nvllm_config = more.toml\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest_modal_vllm.cli", "platforms"],
        cwd=pytester.path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "from-ini" in result.stdout


# ---------------------------------------------------------------------------- the bundled app


def _bundled_command(deploy_env: dict[str, str]) -> list[str]:
    """The vLLM command the bundled app builds from exactly these settings (as a deploy
    hands them over, in MODAL_VLLM_SETTINGS)."""
    from pytest_modal_vllm.modal_sdk import load_app_file

    loaded = load_app_file(bundled_app_file(), deploy_env)
    module: Any = loaded.module
    return list(module.build_vllm_command(module.SETTINGS))


def test_modal_qwen_answers_without_thinking_and_a_field_turns_it_on(tmp_path: Path) -> None:
    qwen = resolve_platform(builtin_platforms()["modal-qwen"], settings(), {})
    assert qwen.deploy_env["THINKING"] == "off"
    assert qwen.client.max_tokens == 1024  # a bounded answer for LangChain clients
    command = _bundled_command(dict(qwen.deploy_env))
    flag = command.index("--default-chat-template-kwargs")
    assert command[flag + 1] == '{"enable_thinking": false}'

    (tmp_path / "pyproject.toml").write_text(
        '[tool.modal-vllm.platforms.qwen-thinks]\nkind = "modal"\napp = "q"\n'
        'deploy_env = { MODEL_NAME = "Qwen/Qwen3-8B-FP8" }\nthinking = true\n'
    )
    from pytest_modal_vllm.platforms import load_platforms

    thinks = resolve_platform(load_platforms(tmp_path, None)["qwen-thinks"], settings(), {})
    command = _bundled_command(dict(thinks.deploy_env))
    assert command[command.index("--default-chat-template-kwargs") + 1] == (
        '{"enable_thinking": true}'
    )
    llama = resolve_platform(builtin_platforms()["modal-llama"], settings(), {})
    assert "--default-chat-template-kwargs" not in _bundled_command(dict(llama.deploy_env))


def test_snapshot_mode_is_one_field_and_points_at_the_apps_server() -> None:
    plain = resolve_platform(Platform(name="m", kind="modal", app="a"), settings(), {})
    assert plain.app_mode == Setting("plain", "app default")
    assert "SNAPSHOT" not in plain.deploy_env
    snapshot = Platform(name="m", kind="modal", app="a", snapshot=True)
    snap = resolve_platform(snapshot, settings(), {})
    assert snap.deploy_env["SNAPSHOT"] == "1"
    assert snap.modal == ModalTarget("a", None, "serve")  # the bundled app's @app.server
    assert snap.app_mode == Setting("snapshot", "platform m")


def test_deploys_see_only_the_platforms_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU, VLLM_ARGS, MAX_MODEL_LEN... in the shell or .env never reach a built-in's deploy."""
    from pytest_modal_vllm.modal_sdk import load_app_file

    for name, value in {
        "GPU": "A10G:4",
        "VLLM_ARGS": "--gpu-memory-utilization 0.2",
        "MAX_MODEL_LEN": "512",
        "FAST_BOOT": "0",
        "TOOL_CALL_PARSER": "mistral",
    }.items():
        monkeypatch.setenv(name, value)
    llama = resolve_platform(builtin_platforms()["modal-llama"], settings(), {})
    module: Any = load_app_file(bundled_app_file(), dict(llama.deploy_env)).module
    app_settings = module.SETTINGS
    assert app_settings.gpu == "H100:1"
    assert app_settings.vllm_args == ()
    assert app_settings.max_model_len is None
    assert app_settings.fast_boot is True
    assert app_settings.tool_call_parser is None
