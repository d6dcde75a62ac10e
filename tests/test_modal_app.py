"""The bundled Modal app, offline: settings, the vLLM command and environment, the auth
middleware (through a small ASGI harness), fail-fast start-up (with small child processes),
the sleep/wake helpers (against a small local HTTP server), and the app definition imported
without a token or network (plain web function, or the snapshot server)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from conftest import load_module

ROOT = Path(__file__).resolve().parent.parent
APP_FILE = ROOT / "modal_app" / "vllm_server.py"
AUTH_FILE = ROOT / "modal_app" / "vllm_auth.py"


vs = load_module(APP_FILE, "vllm_server_under_test")
auth = load_module(AUTH_FILE, "vllm_auth_under_test")


def command(env: dict[str, str]) -> list[str]:
    return list(vs.build_vllm_command(vs.Settings.from_env(env)))


def flag_value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


# ---------------------------------------------------------------- defaults


def test_defaults_serve_the_pinned_llama_model_closed_and_eager() -> None:
    settings = vs.Settings.from_env({})
    assert settings.model_name == "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
    assert settings.app_name == "modal-vllm-llama"
    assert settings.gpu == "H100:1"
    assert settings.api_key_secret == "vllm-api-key"
    assert settings.scaledown_window == 300
    assert settings.startup_timeout == 900
    assert settings.fast_boot is True
    assert settings.allow_unauthenticated is False
    assert (settings.max_inputs, settings.max_containers) == (32, 1)
    assert settings.snapshot is False
    assert settings.thinking is None
    # Modal's own vLLM example: vLLM 0.21.0 on the CUDA 12.9 devel image.
    assert (settings.vllm_version, settings.base_image) == (
        "0.21.0",
        "nvidia/cuda:12.9.0-devel-ubuntu22.04",
    )

    cmd = command({})
    assert cmd[:3] == ["vllm", "serve", "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"]
    # The revision Modal's vllm_inference.py pins for this model.
    assert flag_value(cmd, "--revision") == "12fd6884d2585dd4d020373e7f39f74507b31866"
    assert flag_value(cmd, "--port") == "8000"
    assert flag_value(cmd, "--host") == "0.0.0.0"
    assert "--enforce-eager" in cmd
    assert flag_value(cmd, "--middleware") == "vllm_auth.BearerAuthMiddleware"
    for absent in (
        "--api-key",  # the key stays in the environment
        "--tool-call-parser",
        "--max-model-len",
        "--tensor-parallel-size",
        "--enable-sleep-mode",
        "--default-chat-template-kwargs",
    ):
        assert absent not in cmd


def test_served_under_its_own_name_and_the_alias_llm() -> None:
    cmd = command({"MODEL_NAME": "Org/Some-Model"})
    start = cmd.index("--served-model-name")
    assert cmd[start + 1 : start + 3] == ["Org/Some-Model", "llm"]


def test_the_builder_is_pure() -> None:
    settings = vs.Settings.from_env({"MODEL_NAME": "Org/M"})
    assert vs.build_vllm_command(settings) == vs.build_vllm_command(settings)


# ---------------------------------------------------------------- each setting


def test_model_and_revision() -> None:
    cmd = command({"MODEL_NAME": "Org/Other", "MODEL_REVISION": "abc123"})
    assert cmd[2] == "Org/Other"
    assert flag_value(cmd, "--revision") == "abc123"
    # An unknown model without MODEL_REVISION is not pinned.
    assert "--revision" not in command({"MODEL_NAME": "Org/Other"})
    # `main` means "follow the branch": no pin even for a pinned model.
    assert "--revision" not in command({"MODEL_REVISION": "main"})


def test_the_bundled_qwen_model_is_pinned_to_the_public_revision() -> None:
    cmd = command({"MODEL_NAME": "Qwen/Qwen3-8B-FP8"})
    assert flag_value(cmd, "--revision") == "220b46e3b2180893580a4454f21f22d3ebb187d3"


def test_every_pin_names_its_public_source() -> None:
    source = APP_FILE.read_text()
    block = source[source.index("KNOWN_REVISIONS: dict") : source.index("# The auth middleware")]
    for model, revision in vs.KNOWN_REVISIONS.items():
        assert len(revision) == 40 and int(revision, 16) >= 0
        before = block[: block.index(f'"{model}"')]
        assert "modal-labs/modal-examples" in before.rsplit('",\n', 1)[-1], model


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


@pytest.mark.parametrize(("value", "expected"), [("off", False), ("on", True), ("0", False)])
def test_thinking_sets_the_chat_template_default(value: str, expected: bool) -> None:
    cmd = command({"THINKING": value})
    assert json.loads(flag_value(cmd, "--default-chat-template-kwargs")) == {
        "enable_thinking": expected
    }


def test_thinking_unset_leaves_the_model_default_and_a_bad_value_is_named() -> None:
    assert vs.Settings.from_env({"THINKING": " "}).thinking is None
    assert "--default-chat-template-kwargs" not in command({})
    with pytest.raises(ValueError, match="THINKING"):
        vs.Settings.from_env({"THINKING": "sometimes"})


def test_vllm_args_are_split_like_a_shell_and_come_last() -> None:
    cmd = command({"VLLM_ARGS": "--max-num-seqs 16 --chat-template '/a b/t.jinja'"})
    assert cmd[-4:] == ["--max-num-seqs", "16", "--chat-template", "/a b/t.jinja"]
    # Last means they can override the builder's own flags (vLLM keeps the last value).
    assert command({"VLLM_ARGS": "--port 9000"})[-2:] == ["--port", "9000"]


def test_unauthenticated_opt_out_drops_the_middleware() -> None:
    settings = vs.Settings.from_env({"ALLOW_UNAUTHENTICATED": "1"})
    assert settings.allow_unauthenticated is True
    assert "--middleware" not in vs.build_vllm_command(settings)
    assert "ALLOW_UNAUTHENTICATED" in vs.unauthenticated_warning(settings)
    assert "anyone who knows the URL" in vs.unauthenticated_warning(settings)
    with_proxy = vs.Settings.from_env({"ALLOW_UNAUTHENTICATED": "1", "PROXY_AUTH": "1"})
    assert "proxy credentials" in vs.unauthenticated_warning(with_proxy)


def test_api_key_secret_name() -> None:
    assert vs.Settings.from_env({"API_KEY_SECRET": "team-key"}).api_key_secret == "team-key"


def test_a_key_in_vllm_args_never_shows_in_the_printed_command() -> None:
    cmd = command({"VLLM_ARGS": "--api-key sk-very-secret"})
    shown = vs.redact_command(cmd)
    assert "sk-very-secret" not in shown
    assert "--api-key '***'" in shown or "--api-key ***" in shown
    assert "sk-very-secret" not in vs.redact_command(["vllm", "--api-key=sk-very-secret"])


@pytest.mark.parametrize(
    ("value", "expected"), [("", 1), ("3", 3), ("none", None), ("Unlimited", None)]
)
def test_max_containers(value: str, expected: int | None) -> None:
    assert vs.Settings.from_env({"MAX_CONTAINERS": value}).max_containers == expected


def test_scale_bounds_reject_zero() -> None:
    with pytest.raises(ValueError, match="MAX_CONTAINERS"):
        vs.Settings.from_env({"MAX_CONTAINERS": "0"})
    with pytest.raises(ValueError, match="MAX_INPUTS"):
        vs.Settings.from_env({"MAX_INPUTS": "-1"})


def test_versions_are_one_setting_away() -> None:
    settings = vs.Settings.from_env(
        {"VLLM_VERSION": "0.27.1", "BASE_IMAGE": "nvidia/cuda:13.0.1-devel-ubuntu24.04"}
    )
    assert settings.vllm_version == "0.27.1"
    assert settings.base_image == "nvidia/cuda:13.0.1-devel-ubuntu24.04"


def test_snapshot_mode_turns_on_sleep_mode_and_compiles() -> None:
    settings = vs.Settings.from_env({"SNAPSHOT": "1"})
    cmd = vs.build_vllm_command(settings)
    assert "--enable-sleep-mode" in cmd
    # The snapshot keeps compiled graphs: no eager mode unless asked for.
    assert settings.fast_boot is False
    assert "--enforce-eager" not in cmd
    assert "--enforce-eager" in command({"SNAPSHOT": "1", "FAST_BOOT": "1"})
    # Still closed.
    assert flag_value(cmd, "--middleware") == "vllm_auth.BearerAuthMiddleware"


def test_snapshot_mode_refuses_to_open_the_dev_routes_to_everyone() -> None:
    with pytest.raises(ValueError, match="dev-mode routes"):
        vs.Settings.from_env({"SNAPSHOT": "1", "ALLOW_UNAUTHENTICATED": "1"})
    # Behind Modal proxy auth only the workspace reaches it: allowed.
    vs.Settings.from_env({"SNAPSHOT": "1", "ALLOW_UNAUTHENTICATED": "1", "PROXY_AUTH": "1"})


ROUND_TRIP_ENVS: list[dict[str, str]] = [
    {},
    {"MODEL_NAME": "Org/Other"},
    {"MODEL_REVISION": "main"},
    {"SNAPSHOT": "1"},
    {"MAX_CONTAINERS": "none", "THINKING": "on"},
    {
        "MODEL_NAME": "Qwen/Qwen3-8B-FP8",
        "MODEL_REVISION": "0123456789abcdef0123456789abcdef01234567",
        "GPU": "H100:2",
        "MAX_MODEL_LEN": "4096",
        "FAST_BOOT": "0",
        "TOOL_CALL_PARSER": "hermes",
        "THINKING": "off",
        "VLLM_ARGS": "--max-num-seqs 8 --x 'a b'",
        "ALLOW_UNAUTHENTICATED": "yes",
        "HF_SECRET": "hf",
        "PROXY_AUTH": "1",
        "MAX_INPUTS": "4",
        "MAX_CONTAINERS": "3",
        "SNAPSHOT": "1",
        "VLLM_VERSION": "0.30.0",
        "BASE_IMAGE": "vllm/vllm-openai:v0.30.0",
        "SCALEDOWN_WINDOW": "60",
        "STARTUP_TIMEOUT": "1200",
        "API_KEY_SECRET": "k",
        "APP_NAME": "x",
    },
]


@pytest.mark.parametrize("env", ROUND_TRIP_ENVS)
def test_settings_round_trip_through_the_container_environment(env: dict[str, str]) -> None:
    # The container rebuilds its settings from `to_env()` (as MODAL_VLLM_SETTINGS).
    settings = vs.Settings.from_env(env)
    assert vs.Settings.from_env(settings.to_env()) == settings
    as_json = {vs.SETTINGS_ENV: json.dumps(settings.to_env())}
    assert vs.Settings.from_env(as_json) == settings
    assert set(settings.to_env()) <= set(vs.SETTING_NAMES)
    assert "VLLM_API_KEY" not in settings.to_env()


def test_every_setting_is_in_the_docstring_table_and_round_trips() -> None:
    doc = vs.__doc__
    for name in vs.SETTING_NAMES:
        assert f"`{name}`" in doc, name
    # The fullest round-trip case sets every setting.
    assert set(ROUND_TRIP_ENVS[-1]) == set(vs.SETTING_NAMES)


# ---------------------------------------------------------------- settings isolation


def test_the_settings_object_is_the_only_source_when_set() -> None:
    env = {
        vs.SETTINGS_ENV: json.dumps({"MODEL_NAME": "Org/Chosen", "THINKING": "off"}),
        # Unrelated variables of the shell or .env: none of them may reach the deploy.
        "MODEL_NAME": "Org/FromTheShell",
        "GPU": "B200:8",
        "ALLOW_UNAUTHENTICATED": "1",
        "VLLM_ARGS": "--evil",
    }
    settings = vs.Settings.from_env(env)
    assert settings.model_name == "Org/Chosen"
    assert settings.thinking is False
    assert settings.gpu == "H100:1"  # the default, not the shell's
    assert settings.allow_unauthenticated is False
    assert settings.vllm_args == ()


def test_without_the_settings_object_the_environment_counts() -> None:
    assert vs.Settings.from_env({"MODEL_NAME": "Org/Shell"}).model_name == "Org/Shell"
    assert vs.Settings.from_env({vs.SETTINGS_ENV: "  ", "GPU": "A10G"}).gpu == "A10G"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["MODEL_NAME"]', "JSON object"),
        ('{"MODEL_NAMES": "x"}', "unknown settings \\['MODEL_NAMES'\\]"),
        ('{"MAX_INPUTS": 4}', "must be strings"),
    ],
)
def test_a_bad_settings_object_is_refused(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        vs.Settings.from_env({vs.SETTINGS_ENV: raw})


# ---------------------------------------------------------------- the vLLM process environment


def test_the_key_stays_in_the_environment_and_the_middleware_is_importable() -> None:
    settings = vs.Settings.from_env({})
    base = {"VLLM_API_KEY": "sk-k", "PYTHONPATH": "/x", vs.SETTINGS_ENV: "{}", "PATH": "/bin"}
    env = vs.vllm_environment(settings, base, auth_dir="/opt/auth")
    assert env["VLLM_API_KEY"] == "sk-k"
    assert env["PYTHONPATH"] == os.pathsep.join(["/opt/auth", "/x"])
    assert vs.SETTINGS_ENV not in env
    assert "VLLM_SERVER_DEV_MODE" not in env
    assert vs.vllm_environment(settings, {"VLLM_API_KEY": "k"})["PYTHONPATH"] == vs.AUTH_DIR


def test_no_key_no_start() -> None:
    settings = vs.Settings.from_env({"API_KEY_SECRET": "team"})
    with pytest.raises(vs.MissingApiKey, match="modal secret create team VLLM_API_KEY"):
        vs.vllm_environment(settings, {"VLLM_API_KEY": " "})


def test_unauthenticated_removes_the_key() -> None:
    settings = vs.Settings.from_env({"ALLOW_UNAUTHENTICATED": "1"})
    env = vs.vllm_environment(settings, {"VLLM_API_KEY": "stray", "PYTHONPATH": "/x"})
    assert "VLLM_API_KEY" not in env
    assert env["PYTHONPATH"] == "/x"


def test_snapshot_mode_turns_on_the_dev_routes() -> None:
    settings = vs.Settings.from_env({"SNAPSHOT": "1"})
    env = vs.vllm_environment(settings, {"VLLM_API_KEY": "k"})
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"


# ---------------------------------------------------------------- caches on Volumes


def _under(path: str, root: str) -> bool:
    return Path(path) == Path(root) or Path(root) in Path(path).parents


def test_every_cache_path_lies_under_a_mounted_volume() -> None:
    env = vs.image_env()
    cache_vars = {
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "FLASHINFER_WORKSPACE_BASE",
        "CUDA_CACHE_PATH",
    }
    assert cache_vars <= set(env)
    mounts = list(vs.VOLUMES)
    for name in cache_vars | set(vs.CACHE_ENV):
        assert any(_under(env[name], mount) for mount in mounts), (name, env[name], mounts)


# ---------------------------------------------------------------- the auth middleware


class Harness:
    """Drives the middleware like an ASGI server; records what reached the app and what was
    sent back."""

    def __init__(self, key: str | None = "sk-right") -> None:
        self.reached: list[str] = []
        self.sent: list[dict[str, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            self.reached.append(scope.get("path", scope["type"]))

        self.middleware = auth.BearerAuthMiddleware(app, api_key=key)

    def call(
        self,
        path: str = "/v1/models",
        *,
        authorization: str | None = None,
        kind: str = "http",
        method: str = "GET",
        root_path: str = "",
    ) -> dict[str, Any]:
        headers = [(b"host", b"x")]
        if authorization is not None:
            headers.append((b"authorization", authorization.encode()))
        scope = {
            "type": kind,
            "path": path,
            "root_path": root_path,
            "method": method,
            "headers": headers,
        }
        self.reached.clear()
        self.sent.clear()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            self.sent.append(dict(message))

        asyncio.run(self.middleware(scope, receive, send))
        if self.reached:
            return {"reached": True}
        return {"reached": False, "sent": list(self.sent)}


def _is_401(result: dict[str, Any]) -> bool:
    if result["reached"]:
        return False
    start, body = result["sent"]
    headers = dict(start["headers"])
    return (
        start["status"] == 401
        and json.loads(body["body"]) == {"error": "Unauthorized"}
        and headers[b"content-type"] == b"application/json"
        and headers[b"www-authenticate"] == b"Bearer"
        and int(headers[b"content-length"]) == len(body["body"])
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models",
        "/v1/chat/completions",
        "/invocations",
        "/tokenize",
        "/detokenize",
        "/metrics",
        "/pooling",
        "/score",
        "/rerank",
        "/classify",
        "/sleep",
        "/wake_up",
        "/collective_rpc",
        "/version",
        "/docs",
        "/openapi.json",
        "/",
        "/health/",
        "/healthz",
        "//health",
        "/health/../v1/models",
        "/no-such-route",
    ],
)
def test_every_path_but_health_needs_the_key(path: str) -> None:
    harness = Harness()
    assert _is_401(harness.call(path))
    assert _is_401(harness.call(path, authorization="Bearer sk-wrong"))
    assert harness.call(path, authorization="Bearer sk-right") == {"reached": True}


def test_health_is_open() -> None:
    harness = Harness()
    assert harness.call("/health") == {"reached": True}
    assert harness.call("/health", authorization="Bearer sk-wrong") == {"reached": True}
    # Behind vLLM's --root-path the same route.
    assert harness.call("/api/health", root_path="/api") == {"reached": True}
    assert _is_401(harness.call("/api/v1/models", root_path="/api"))


@pytest.mark.parametrize(
    "authorization",
    ["sk-right", "Basic sk-right", "Bearer", "Bearer ", "Bearer sk-righ", "Bearer sk-right2"],
)
def test_only_a_bearer_token_equal_to_the_key_passes(authorization: str) -> None:
    assert _is_401(Harness().call(authorization=authorization))


def test_the_scheme_is_case_insensitive() -> None:
    assert Harness().call(authorization="bearer sk-right") == {"reached": True}
    assert Harness().call(authorization="BEARER  sk-right ") == {"reached": True}


def test_cors_preflight_is_not_exempt() -> None:
    harness = Harness()
    assert _is_401(harness.call("/v1/chat/completions", method="OPTIONS"))
    reached = harness.call(
        "/v1/chat/completions", method="OPTIONS", authorization="Bearer sk-right"
    )
    assert reached == {"reached": True}


def test_websockets_need_the_key_too() -> None:
    harness = Harness()
    refused = harness.call("/v1/realtime", kind="websocket")
    assert refused["sent"] == [{"type": "websocket.close", "code": 1008, "reason": "Unauthorized"}]
    # Not even /health is open to a websocket.
    assert not harness.call("/health", kind="websocket")["reached"]
    accepted = harness.call("/v1/realtime", kind="websocket", authorization="Bearer sk-right")
    assert accepted == {"reached": True}


def test_lifespan_passes_through() -> None:
    assert Harness().call(kind="lifespan") == {"reached": True}


def test_without_a_configured_key_everything_but_health_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    harness = Harness(key="")
    assert "VLLM_API_KEY is not set" in capsys.readouterr().err
    assert _is_401(harness.call(authorization="Bearer "))
    assert _is_401(harness.call(authorization="Bearer anything"))
    assert harness.call("/health") == {"reached": True}


def test_the_key_comes_from_vllm_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-from-env")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    middleware = auth.BearerAuthMiddleware(app)
    headers = [(b"authorization", b"Bearer sk-from-env")]
    assert middleware.authorized({"type": "http", "headers": headers})
    assert not middleware.authorized({"type": "http", "headers": [(b"authorization", b"x")]})


def test_the_middleware_is_pure_standard_library() -> None:
    script = f"""
import sys
sys.path.insert(0, {str(AUTH_FILE.parent)!r})
import vllm_auth
third_party = {{"starlette", "fastapi", "vllm", "modal", "httpx"}} & set(sys.modules)
print(sorted(third_party))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------- fail fast


def child(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", code]


def test_a_child_that_exits_fails_at_once_with_its_code_and_last_lines() -> None:
    lines: list[str] = []
    code = "import sys\nfor i in range(100): print(f'line {i}')\nsys.exit(3)"
    server = vs.start_server(child(code), os.environ, relay=lines.append)
    started = time.monotonic()
    with pytest.raises(vs.ServerExited) as caught:
        # A long poll interval: the exit must still be seen at once.
        vs.wait_until_serving(server, port=1, timeout=600, interval=30)
    assert time.monotonic() - started < 15
    error = caught.value
    assert error.returncode == 3
    assert error.tail == [f"line {i}" for i in range(60, 100)]  # the last 40
    assert "vLLM exited with code 3" in str(error)
    assert "line 99" in str(error)
    assert lines == [f"line {i}" for i in range(100)]  # every line relayed, in order


def test_stderr_is_relayed_and_kept_too() -> None:
    code = (
        "import sys\nprint('out')\n"
        "print('error: unrecognized arguments: --x', file=sys.stderr)\nsys.exit(2)"
    )
    server = vs.start_server(child(code), os.environ, relay=lambda line: None)
    with pytest.raises(vs.ServerExited) as caught:
        vs.wait_until_serving(server, port=1, timeout=60)
    assert caught.value.returncode == 2
    assert "error: unrecognized arguments: --x" in caught.value.tail


def test_exit_code_zero_is_not_serving() -> None:
    server = vs.start_server(child("print('bye')"), os.environ, relay=lambda line: None)
    with pytest.raises(vs.ServerExited, match="code 0"):
        vs.wait_until_serving(server, port=1, timeout=60)


def test_a_killed_child_names_the_signal() -> None:
    code = "import os, signal\nprint('oom', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)"
    server = vs.start_server(child(code), os.environ, relay=lambda line: None)
    with pytest.raises(vs.ServerExited, match=r"signal 9 \(SIGKILL\)"):
        vs.wait_until_serving(server, port=1, timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVING_CHILD = """
import http.server, sys, time
time.sleep(0.5)
status = int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        print("request", self.path, flush=True)
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_a_child_that_serves_is_ready() -> None:
    port = _free_port()
    cmd = [sys.executable, "-u", "-c", SERVING_CHILD, str(port), "200"]
    server = vs.start_server(cmd, os.environ, relay=lambda line: None)
    try:
        seconds = vs.wait_until_serving(server, port=port, timeout=60, interval=0.1)
        assert seconds >= 0
        assert server.process.poll() is None
        assert "listening" in server.last_lines()
    finally:
        assert server.stop(timeout=5) is not None
    assert server.process.poll() is not None


def test_a_child_that_never_serves_times_out_and_is_stopped() -> None:
    code = "import time\nprint('loading weights', flush=True)\ntime.sleep(600)"
    server = vs.start_server(child(code), os.environ, relay=lambda line: None)
    with pytest.raises(vs.StartupTimeout) as caught:
        vs.wait_until_serving(server, port=_free_port(), timeout=1, interval=0.2)
    assert "STARTUP_TIMEOUT=1s" in str(caught.value)
    assert caught.value.tail == ["loading weights"]
    assert server.process.poll() is not None  # stopped


def test_launch_fails_fast_with_a_phase_line(monkeypatch: pytest.MonkeyPatch) -> None:
    phases: list[str] = []
    log = vs.PhaseLog(emit=phases.append)
    output: list[str] = []
    settings = vs.Settings.from_env({"STARTUP_TIMEOUT": "600"})
    bad = child(
        "import sys\nprint('api_server.py: error: unrecognized arguments: --bogus')\nsys.exit(2)"
    )
    with pytest.raises(vs.ServerExited) as caught:
        vs.launch_vllm(
            settings,
            {"VLLM_API_KEY": "sk-k", "PATH": os.environ.get("PATH", "")},
            log,
            command=bad,
            port=_free_port(),
            relay=output.append,
        )
    assert caught.value.returncode == 2
    assert "unrecognized arguments: --bogus" in str(caught.value)
    assert output[0].startswith("modal-vllm: starting vLLM 0.21.0: ")
    assert [line.split(" after ")[0] for line in phases] == [
        "modal-vllm: phase vllm-started",
        "modal-vllm: phase failed",
    ]
    assert "vLLM exited with code 2" in phases[-1]


def test_phase_lines_are_greppable() -> None:
    now = [100.0]
    lines: list[str] = []
    log = vs.PhaseLog(clock=lambda: now[0], emit=lines.append)
    now[0] = 141.24
    assert log.mark("engine-ready") == "modal-vllm: phase engine-ready after 41.2s"
    log.restart()
    now[0] = 142.5
    log.mark("awake", "serving")
    assert lines == [
        "modal-vllm: phase engine-ready after 41.2s",
        "modal-vllm: phase awake after 1.3s (serving)",
    ]


# ---------------------------------------------------------------- sleep / wake helpers


class FakeVllm(BaseHTTPRequestHandler):
    """The few vLLM routes the snapshot sequence uses, behind a key."""

    key = "sk-right"
    log: ClassVar[list[str]] = []
    sleeping = False
    chat_status = 200

    def _answer(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        cls = type(self)
        cls.log.append(f"{method} {self.path}")
        if self.headers.get("Authorization") != f"Bearer {cls.key}":
            self._answer(401, {"error": "Unauthorized"})
        elif self.path == "/v1/completions":
            self._answer(200, {"choices": [{"text": "Paris"}]})
        elif self.path == "/v1/chat/completions":
            self._answer(cls.chat_status, {"error": "no chat template"})
        elif self.path.startswith("/sleep"):
            cls.sleeping = True
            self._answer(200, {"status": "sleeping", "level": 1})
        elif self.path == "/wake_up":
            cls.sleeping = False
            self._answer(200, {"status": "awake"})
        elif self.path == "/is_sleeping":
            self._answer(200, {"is_sleeping": cls.sleeping})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def fake_vllm() -> Iterator[str]:
    FakeVllm.log = []
    FakeVllm.sleeping = False
    FakeVllm.chat_status = 200
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_snapshot_sequence(fake_vllm: str) -> None:
    assert vs.warm_up(fake_vllm, "sk-right") == 4
    vs.sleep_engine(fake_vllm, "sk-right")
    assert vs.is_sleeping(fake_vllm, "sk-right")
    vs.wake_engine(fake_vllm, "sk-right")
    assert FakeVllm.log == [
        "POST /v1/completions",
        "POST /v1/completions",
        "POST /v1/completions",
        "POST /v1/chat/completions",
        "POST /sleep?level=1",
        "GET /is_sleeping",
        "GET /is_sleeping",
        "POST /wake_up",
        "GET /is_sleeping",
    ]


def test_warm_up_tolerates_a_model_without_a_chat_template(fake_vllm: str) -> None:
    FakeVllm.chat_status = 400
    assert vs.warm_up(fake_vllm, "sk-right", rounds=1) == 2
    FakeVllm.chat_status = 500
    with pytest.raises(vs.EngineControlError, match="chat/completions answered 500"):
        vs.warm_up(fake_vllm, "sk-right", rounds=1)


def test_the_helpers_fail_loudly(fake_vllm: str) -> None:
    with pytest.raises(vs.EngineControlError, match="answered 401"):
        vs.sleep_engine(fake_vllm, "sk-wrong")
    with pytest.raises(vs.EngineControlError, match="failed"):
        vs.wake_engine("http://127.0.0.1:1", "sk-right", timeout=2)


# ---------------------------------------------------------------- the app definition, offline


def _clean_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("MODAL_") and key not in ("HOME",) and key not in vs.SETTING_NAMES
    }
    env["HOME"] = str(home)
    return env


INSPECT = """
import importlib.util, json, socket, sys

def refuse(*args, **kwargs):
    raise RuntimeError("network access during import")

socket.socket.connect = refuse
socket.create_connection = refuse

from modal._functions import _Function
recorded = []
original = _Function._from_local
def record(*args, **kwargs):
    recorded.append(dict(kwargs, _info=args[0] if args else kwargs.get("info")))
    return original(*args, **kwargs)
_Function._from_local = staticmethod(record)

spec = importlib.util.spec_from_file_location("vllm_server", APP_FILE)
module = importlib.util.module_from_spec(spec)
sys.modules["vllm_server"] = module
spec.loader.exec_module(module)

import modal
from modal._partial_function import _PartialFunctionFlags as F, _find_partial_methods_for_user_cls
from modal._utils.async_utils import synchronizer

(kwargs,) = recorded
info = {
    "app": module.app.name,
    "serve": type(module.serve).__name__,
    "settings": module.SETTINGS.to_env(),
    "volumes": sorted(str(path) for path in kwargs["volumes"]),
    "volume_names": sorted(v.name for v in kwargs["volumes"].values()),
    "function_name": kwargs["_info"].function_name,
    "implementation_name": kwargs["_info"].implementation_name,
    "enable_memory_snapshot": kwargs["enable_memory_snapshot"],
    "experimental_options": kwargs["experimental_options"],
    "max_containers": kwargs["max_containers"],
    "max_concurrent_inputs": kwargs["max_concurrent_inputs"],
    "target_concurrent_inputs": kwargs["target_concurrent_inputs"],
    "startup_timeout": kwargs["startup_timeout"],
    "secrets": len(kwargs["secrets"]),
}
web, http = kwargs.get("webhook_config"), kwargs.get("http_config")
info |= {
    "web_server_port": web.web_server_port if web else None,
    "http_port": http.port if http else None,
    "unauthenticated": http.unauthenticated if http else None,
}
if isinstance(module.serve, modal.Server):
    server = synchronizer._translate_in(module.serve)
    user_cls = server._get_user_cls()
    info["phases"] = {
        flag.name: sorted(_find_partial_methods_for_user_cls(user_cls, flag))
        for flag in (F.ENTER_PRE_SNAPSHOT, F.ENTER_POST_SNAPSHOT, F.EXIT)
    }
    info["module_attr_is_server"] = module.VllmSnapshotServer is module.serve
print(json.dumps(info))
"""


def inspect_app(tmp_path: Path, settings: dict[str, str], *, as_json: bool = False) -> Any:
    """Import the app file in a fresh interpreter with no Modal credentials and no network;
    what it registered with Modal."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = _clean_env(home)
    if as_json:
        env[vs.SETTINGS_ENV] = json.dumps(settings)
    else:
        env.update(settings)
    result = subprocess.run(
        [sys.executable, "-c", f"APP_FILE = {str(APP_FILE)!r}\n" + INSPECT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not list(home.iterdir())  # nothing written: no token file, no config
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_plain_mode_is_the_web_function_serve(tmp_path: Path) -> None:
    info = inspect_app(tmp_path, {})
    assert info["app"] == "modal-vllm-llama"
    assert info["serve"] == "Function"
    assert info["enable_memory_snapshot"] is False
    assert info["experimental_options"] == {}
    assert info["web_server_port"] == 8000
    assert info["max_concurrent_inputs"] == 32
    assert info["max_containers"] == 1
    # serve() waits STARTUP_TIMEOUT itself: Modal's own bound is longer.
    assert info["startup_timeout"] > 900
    assert info["secrets"] == 2  # the settings and the API key
    assert info["volumes"] == sorted(vs.VOLUMES)
    assert info["volume_names"] == sorted(vs.VOLUMES.values())
    assert info["function_name"] == "serve"


def test_snapshot_mode_is_a_server_with_gpu_snapshots_and_two_enter_phases(
    tmp_path: Path,
) -> None:
    info = inspect_app(tmp_path, {"SNAPSHOT": "1", "MAX_INPUTS": "16", "MAX_CONTAINERS": "2"})
    assert info["serve"] == "Server"
    # Registered as `serve` (Server.from_name(app, "serve")); the container finds the class
    # by its implementation name, which is the same Server object in the module.
    assert info["function_name"] == "serve"
    assert info["implementation_name"] == "VllmSnapshotServer.*"
    assert info["module_attr_is_server"] is True
    assert info["enable_memory_snapshot"] is True
    assert info["experimental_options"] == {"enable_gpu_snapshot": "True"}
    # snap=True: start vLLM, warm it up, put it to sleep; snap=False: wake it after a restore.
    assert info["phases"] == {
        "ENTER_PRE_SNAPSHOT": ["start_and_sleep"],
        "ENTER_POST_SNAPSHOT": ["wake_and_serve"],
        "EXIT": ["stop"],
    }
    assert info["http_port"] == 8000
    assert info["target_concurrent_inputs"] == 16
    assert info["max_concurrent_inputs"] is None  # no 429s above the target
    assert info["max_containers"] == 2
    assert info["unauthenticated"] is True  # PROXY_AUTH off: the API key guards it
    assert info["volumes"] == sorted(vs.VOLUMES)
    assert inspect_app(tmp_path, {"SNAPSHOT": "1", "PROXY_AUTH": "1"})["unauthenticated"] is False


def test_the_snapshot_sequence_runs_in_the_right_order() -> None:
    source = APP_FILE.read_text()
    start = source[source.index("def start_and_sleep") : source.index("def wake_and_serve")]
    order = [start.index(step) for step in ("launch_vllm(", "warm_up(", "sleep_engine(")]
    assert order == sorted(order)
    wake = source[source.index("def wake_and_serve") : source.index("def stop(self)")]
    assert "wake_engine(" in wake


def test_the_app_reads_only_the_settings_object(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env(home)
    env.update({"MODEL_NAME": "Org/FromTheShell", "ALLOW_UNAUTHENTICATED": "1", "GPU": "B200"})
    env[vs.SETTINGS_ENV] = json.dumps({"MODEL_NAME": "Qwen/Qwen3-8B-FP8", "APP_NAME": "q"})
    script = f"""
import runpy
module = runpy.run_path({str(APP_FILE)!r}, run_name="vllm_server")
s = module["SETTINGS"]
print(module["app"].name, s.model_name, s.gpu, s.allow_unauthenticated)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["q", "Qwen/Qwen3-8B-FP8", "H100:1", "False"]
    assert "ALLOW_UNAUTHENTICATED" not in result.stderr  # the shell's value never counted


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


def test_the_settings_object_travels_into_the_container(tmp_path: Path) -> None:
    info = inspect_app(tmp_path, {"MODEL_NAME": "Org/M", "THINKING": "off"}, as_json=True)
    assert info["settings"]["MODEL_NAME"] == "Org/M"
    assert info["settings"]["THINKING"] == "off"
    assert info["app"] == "modal-vllm-m"
