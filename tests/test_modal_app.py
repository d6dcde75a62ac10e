"""The bundled Modal app: its pure settings and vLLM command builder, and a token-free import."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

APP_FILE = Path(__file__).resolve().parent.parent / "modal_app" / "vllm_server.py"


def _load_pure() -> ModuleType:
    """Import the app file once for its pure helpers (modal objects are lazy: no network)."""
    spec = importlib.util.spec_from_file_location("vllm_server_under_test", APP_FILE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


vs = _load_pure()


def command(env: dict[str, str], api_key: str | None = "sk-test") -> list[str]:
    return list(vs.build_vllm_command(vs.Settings.from_env(env), api_key=api_key))


def flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# ---------------------------------------------------------------- defaults


def test_defaults_serve_the_llama_model_secured_and_eager() -> None:
    settings = vs.Settings.from_env({})
    assert settings.model_name == "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
    assert settings.app_name == "modal-vllm-llama"
    assert settings.gpu == "H100:1"
    assert settings.api_key_secret == "vllm-api-key"
    assert settings.scaledown_window == 300
    assert settings.startup_timeout == 900
    assert settings.fast_boot is True
    assert settings.allow_unauthenticated is False

    cmd = command({})
    assert cmd[:3] == ["vllm", "serve", "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"]
    assert "--revision" not in cmd  # no unverified pin: the default branch
    assert flag_value(cmd, "--port") == "8000"
    assert flag_value(cmd, "--host") == "0.0.0.0"
    assert "--enforce-eager" in cmd
    assert flag_value(cmd, "--api-key") == "sk-test"
    for absent in ("--tool-call-parser", "--max-model-len", "--tensor-parallel-size"):
        assert absent not in cmd


def test_served_under_its_own_name_and_the_alias_llm() -> None:
    cmd = command({"MODEL_NAME": "Org/Some-Model"})
    start = cmd.index("--served-model-name")
    assert cmd[start + 1 : start + 3] == ["Org/Some-Model", "llm"]


def test_the_builder_is_pure() -> None:
    settings = vs.Settings.from_env({"MODEL_NAME": "Org/M"})
    assert vs.build_vllm_command(settings, "k") == vs.build_vllm_command(settings, "k")
    # The environment of this process plays no part once the settings are read.
    assert "--api-key" not in vs.build_vllm_command(settings, None)


# ---------------------------------------------------------------- each setting


def test_model_and_revision() -> None:
    cmd = command({"MODEL_NAME": "Org/Other", "MODEL_REVISION": "abc123"})
    assert cmd[2] == "Org/Other"
    assert flag_value(cmd, "--revision") == "abc123"
    # An unknown model without MODEL_REVISION is not pinned.
    assert "--revision" not in command({"MODEL_NAME": "Org/Other"})
    # `main` means "follow the branch": no pin even for a bundled model.
    assert "--revision" not in command({"MODEL_REVISION": "main"})


def test_a_known_revision_pins_its_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(vs.KNOWN_REVISIONS, "Qwen/Qwen3-8B-FP8", "feedc0de")
    cmd = command({"MODEL_NAME": "Qwen/Qwen3-8B-FP8"})
    assert flag_value(cmd, "--revision") == "feedc0de"


@pytest.mark.parametrize(
    ("model", "app_name"),
    [
        ("RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8", "modal-vllm-llama"),
        ("Qwen/Qwen3-8B-FP8", "modal-vllm-qwen3-8b-fp8"),
        ("Org/" + "X" * 80, "modal-vllm-" + "x" * 52),
    ],
)
def test_app_name_default_follows_the_model(model: str, app_name: str) -> None:
    name = vs.Settings.from_env({"MODEL_NAME": model}).app_name
    assert name == app_name
    assert len(name) < 64  # Modal's limit for app names


def test_app_name_setting_wins() -> None:
    assert vs.Settings.from_env({"APP_NAME": "mine", "MODEL_NAME": "A/B"}).app_name == "mine"


def test_gpu_count_sets_tensor_parallelism() -> None:
    assert flag_value(command({"GPU": "H100:2"}), "--tensor-parallel-size") == "2"
    assert "--tensor-parallel-size" not in command({"GPU": "A100-80GB"})
    assert "--tensor-parallel-size" not in command({"GPU": "H100:1"})
    with pytest.raises(ValueError, match="GPU"):
        vs.Settings.from_env({"GPU": "H100:two"})


def test_windows_and_timeouts() -> None:
    settings = vs.Settings.from_env({"SCALEDOWN_WINDOW": "120", "STARTUP_TIMEOUT": "600"})
    assert (settings.scaledown_window, settings.startup_timeout) == (120, 600)
    with pytest.raises(ValueError, match="SCALEDOWN_WINDOW"):
        vs.Settings.from_env({"SCALEDOWN_WINDOW": "soon"})
    with pytest.raises(ValueError, match="STARTUP_TIMEOUT"):
        vs.Settings.from_env({"STARTUP_TIMEOUT": "0"})


def test_max_model_len() -> None:
    assert flag_value(command({"MAX_MODEL_LEN": "8192"}), "--max-model-len") == "8192"


@pytest.mark.parametrize("off", ["0", "false", "no", "off", "FALSE"])
def test_fast_boot_off_drops_enforce_eager(off: str) -> None:
    assert "--enforce-eager" not in command({"FAST_BOOT": off})


def test_bad_boolean_is_named() -> None:
    with pytest.raises(ValueError, match="FAST_BOOT"):
        vs.Settings.from_env({"FAST_BOOT": "maybe"})


def test_tool_call_parser_turns_on_tool_calling() -> None:
    cmd = command({"TOOL_CALL_PARSER": "hermes"})
    assert "--enable-auto-tool-choice" in cmd
    assert flag_value(cmd, "--tool-call-parser") == "hermes"


def test_vllm_args_are_split_like_a_shell_and_come_last() -> None:
    cmd = command({"VLLM_ARGS": "--max-num-seqs 16 --chat-template '/a b/t.jinja'"})
    assert cmd[-4:] == ["--max-num-seqs", "16", "--chat-template", "/a b/t.jinja"]
    # Last means they can override the builder's own flags (vLLM keeps the last value).
    assert command({"VLLM_ARGS": "--port 9000"})[-2:] == ["--port", "9000"]


def test_unauthenticated_opt_out() -> None:
    settings = vs.Settings.from_env({"ALLOW_UNAUTHENTICATED": "1"})
    assert settings.allow_unauthenticated is True
    assert "--api-key" not in vs.build_vllm_command(settings, None)
    assert "ALLOW_UNAUTHENTICATED" in vs.unauthenticated_warning(settings)


def test_api_key_secret_name() -> None:
    assert vs.Settings.from_env({"API_KEY_SECRET": "team-key"}).api_key_secret == "team-key"


def test_the_key_never_shows_in_the_printed_command() -> None:
    cmd = command({}, api_key="sk-very-secret")
    shown = vs.redact_command(cmd)
    assert "sk-very-secret" not in shown
    assert "--api-key '***'" in shown or "--api-key ***" in shown
    assert "sk-very-secret" not in vs.redact_command(["vllm", "--api-key=sk-very-secret"])


def test_settings_round_trip_through_the_container_environment() -> None:
    # The container rebuilds its settings from `to_env()`: it must give the same settings.
    envs: list[dict[str, str]] = [
        {},
        {"MODEL_NAME": "Org/Other"},
        {"MODEL_REVISION": "main"},
        {
            "MODEL_NAME": "Qwen/Qwen3-8B-FP8",
            "GPU": "H100:2",
            "MAX_MODEL_LEN": "4096",
            "FAST_BOOT": "0",
            "TOOL_CALL_PARSER": "hermes",
            "VLLM_ARGS": "--max-num-seqs 8 --x 'a b'",
            "ALLOW_UNAUTHENTICATED": "yes",
            "HF_SECRET": "hf",
            "PROXY_AUTH": "1",
            "MAX_INPUTS": "4",
            "VLLM_VERSION": "0.30.0",
        },
    ]
    for env in envs:
        settings = vs.Settings.from_env(env)
        assert vs.Settings.from_env(settings.to_env()) == settings
        assert "VLLM_API_KEY" not in settings.to_env()


# ---------------------------------------------------------------- importing without Modal


def _clean_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MODAL_") and key not in ("HOME",)
    }
    env["HOME"] = str(home)
    return env


def test_app_file_imports_without_a_token_or_network(tmp_path: Path) -> None:
    """Import the app file with no Modal credentials: lazy objects, no network, no error."""
    home = tmp_path / "home"
    home.mkdir()
    script = f"""
import importlib.util, json, socket, sys

def refuse(*args, **kwargs):
    raise RuntimeError("network access during import")

socket.socket.connect = refuse
socket.create_connection = refuse
spec = importlib.util.spec_from_file_location("vllm_server", {str(APP_FILE)!r})
module = importlib.util.module_from_spec(spec)
sys.modules["vllm_server"] = module
spec.loader.exec_module(module)
import modal
print(json.dumps({{
    "app": module.app.name,
    "app_is_modal": isinstance(module.app, modal.App),
    "serve_is_function": isinstance(module.serve, modal.Function),
}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_clean_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"app": "modal-vllm-llama", "app_is_modal": True, "serve_is_function": True}
    assert not list(home.iterdir())  # nothing written: no token file, no config


def test_app_file_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    env = _clean_env(tmp_path)
    env.update({"MODEL_NAME": "Qwen/Qwen3-8B-FP8", "APP_NAME": "modal-vllm-qwen"})
    env["ALLOW_UNAUTHENTICATED"] = "1"
    script = f"""
import runpy
module = runpy.run_path({str(APP_FILE)!r}, run_name="vllm_server")
print(module["app"].name, module["SETTINGS"].model_name)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["modal-vllm-qwen", "Qwen/Qwen3-8B-FP8"]
    # The opt-out is loud at deploy time.
    assert "ALLOW_UNAUTHENTICATED" in result.stderr
