"""The Modal SDK adapter, as far as it can be tested for real without Modal's cloud.

Without credentials, Modal 1.6 fails every call at once with `AuthError`, before touching the
network (checked here with sockets that refuse to connect), so the no-credentials path of
the real adapter runs for real. Everything past authentication needs the cloud: the fake
adapter (`fake_modal.py`) stands in for it in the provider and plugin tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fake_modal import FakeModal

from pytest_modal_vllm import modal_sdk
from pytest_modal_vllm.errors import ConfigError, UnavailableError
from pytest_modal_vllm.modal_sdk import (
    ADAPTER_ENV,
    FINGERPRINT_TAG,
    ModalSDK,
    ModalTarget,
    NotDeployedError,
    bundled_app_file,
    load_app_file,
    load_sdk,
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any Modal setting, and HOME pointing at an empty folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])
    env.update(extra)
    return env


def run_python(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=str(REPO),
    )


# ---------------------------------------------------------------- no import cost


def test_importing_the_adapter_and_provider_does_not_import_modal(tmp_path: Path) -> None:
    result = run_python(
        """
        import sys
        import pytest_modal_vllm.modal_sdk
        import pytest_modal_vllm.providers.modal
        from pytest_modal_vllm.modal_sdk import load_sdk
        load_sdk()  # building the adapter imports nothing either
        print("modal" in sys.modules)
        """,
        clean_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------- the bundled app


def test_bundled_app_file_exists() -> None:
    path = bundled_app_file()
    assert path.is_file()
    assert path.name == "vllm_server.py"
    assert path == REPO / "modal_app" / "vllm_server.py"  # a checkout, not a wheel


# ---------------------------------------------------------------- the seam


def test_load_sdk_defaults_to_the_real_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADAPTER_ENV, raising=False)
    assert isinstance(load_sdk(), ModalSDK)


def test_load_sdk_loads_module_attr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADAPTER_ENV, "fake_modal:FakeModal")
    assert isinstance(load_sdk(), FakeModal)


@pytest.mark.parametrize(
    "spec", ["fake_modal", "fake_modal:", "no_such_module_xyz:Fake", "fake_modal:NoSuchThing"]
)
def test_load_sdk_bad_spec_is_a_config_error(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(ADAPTER_ENV, spec)
    with pytest.raises(ConfigError, match=ADAPTER_ENV):
        load_sdk()


def test_the_seam_reaches_subprocesses(tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    env = clean_env(
        tmp_path,
        **{
            ADAPTER_ENV: "fake_modal:FakeModal",
            "FAKE_MODAL_CALLS": str(calls),
            "FAKE_MODAL_URLS": json.dumps({"a/serve": "http://127.0.0.1:1"}),
        },
    )
    result = run_python(
        """
        from pytest_modal_vllm.modal_sdk import ModalTarget, load_sdk
        print(load_sdk().locate(ModalTarget("a")))
        """,
        env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "http://127.0.0.1:1"
    assert json.loads(calls.read_text())["call"] == "locate"


# ---------------------------------------------------------------- no credentials, for real

NO_CREDENTIALS_SCRIPT = """
import json, socket, sys, time

def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse

from pytest_modal_vllm.errors import PlatformError
from pytest_modal_vllm.modal_sdk import ModalSDK, ModalTarget, bundled_app_file

sdk = ModalSDK()
calls = {
    "locate": lambda: sdk.locate(ModalTarget("some-app")),
    "locate_server": lambda: sdk.locate(ModalTarget("some-app", None, "Srv", "dev")),
    "status": lambda: sdk.status(ModalTarget("some-app")),
    "autoscaler": lambda: sdk.autoscaler(ModalTarget("some-app")),
    "update_autoscaler": lambda: sdk.update_autoscaler(ModalTarget("some-app"), min_containers=1),
    "leases": lambda: sdk.leases(ModalTarget("some-app")).items(),
    "stop_app": lambda: sdk.stop_app(ModalTarget("some-app")),
    "deploy": lambda: sdk.deploy(bundled_app_file(), {}, ModalTarget("some-app"), "fp"),
    "ephemeral": lambda: sdk.ephemeral(bundled_app_file(), {}, ModalTarget("some-app")).__enter__(),
}
results = {}
for name, call in calls.items():
    started = time.monotonic()
    try:
        call()
        results[name] = {"error": None}
    except PlatformError as error:
        results[name] = {"error": type(error).__name__, "exit_code": error.exit_code,
                         "text": str(error), "seconds": time.monotonic() - started}
print(json.dumps(results))
"""


def test_no_credentials_give_the_auth_hint_at_once_without_network(tmp_path: Path) -> None:
    result = run_python(NO_CREDENTIALS_SCRIPT, clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    results: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(results) == {
        "locate",
        "locate_server",
        "status",
        "autoscaler",
        "update_autoscaler",
        "leases",
        "stop_app",
        "deploy",
        "ephemeral",
    }
    for name, outcome in results.items():
        assert outcome["error"] == "ConfigError", (name, outcome)
        assert outcome["exit_code"] == 4
        text = outcome["text"]
        assert "modal setup" in text, (name, text)
        assert "MODAL_TOKEN_ID" in text
        assert "MODAL_TOKEN_SECRET" in text
        assert "network access attempted" not in text
    assert not list(tmp_path.iterdir())  # no token file, no config written


# ---------------------------------------------------------------- Modal errors, translated


def _raise(exc: BaseException, *, lookup: bool = True) -> None:
    with modal_sdk.modal_errors("looking up", ModalTarget("a"), lookup=lookup):
        raise exc


def test_modal_errors_become_the_plugins_errors() -> None:
    from modal import exception as mx

    with pytest.raises(NotDeployedError, match=r"not deployed.*App 'a' not found"):
        _raise(mx.NotFoundError("App 'a' not found"))
    with pytest.raises(ConfigError, match="modal secret create") as secret:
        _raise(mx.NotFoundError("Secret 'vllm-api-key' not found"), lookup=False)
    assert not isinstance(secret.value, NotDeployedError)
    with pytest.raises(ConfigError, match="modal setup"):
        _raise(mx.AuthError("Token missing"))
    with pytest.raises(ConfigError, match="refused"):
        _raise(mx.InvalidError("bad name"))
    with pytest.raises(UnavailableError, match="ServiceError"):
        _raise(mx.ServiceError("unavailable"))
    with pytest.raises(KeyError):  # not Modal's: passes through untouched
        _raise(KeyError("x"))


@pytest.mark.parametrize(
    ("make", "exit_code", "fragments"),
    [
        # A typo in VLLM_VERSION: a configuration error that points at the build output, not
        # "try again" (which --vllm-unavailable=skip would turn into a silently skipped suite).
        (
            lambda mx: mx.ImageBuildError("Image build for im-1 failed", "im-1"),
            4,
            ["failed to build", "build output", "VLLM_VERSION"],
        ),
        # Not "no valid Modal credentials": the token is valid, it lacks a permission.
        (
            lambda mx: mx.PermissionDeniedError("not allowed to deploy in environment main"),
            4,
            ["denied the permission for looking up", "not allowed to deploy", "token"],
        ),
        (lambda mx: mx.RemoteError("boom in the app"), 4, ["RemoteError", "boom in the app"]),
        (lambda mx: mx.ConnectionError("reset"), 75, ["try again"]),
        (lambda mx: mx.InternalError("oops"), 75, ["try again"]),
        (lambda mx: mx.FunctionTimeoutError("slow"), 75, ["try again"]),
    ],
    ids=["build", "permission", "remote", "connection", "internal", "timeout"],
)
def test_modal_errors_are_mapped_by_meaning(make: Any, exit_code: int, fragments: list) -> None:
    from modal import exception as mx

    with pytest.raises((ConfigError, UnavailableError)) as caught:
        _raise(make(mx))
    assert caught.value.exit_code == exit_code
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "no valid Modal credentials" not in str(caught.value)


# ---------------------------------------------------------------- importing app files

APP_TEMPLATE = """
import os
import modal

SEEN = os.environ.get("FAKE_SETTING")
app = modal.App(os.environ.get("APP_NAME", "default-name"))

@app.function()
@modal.web_server(port=8000)
def serve() -> None:
    pass
"""


def test_load_app_file_applies_deploy_env_only_during_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modal

    app_file = tmp_path / "my_app.py"
    app_file.write_text(APP_TEMPLATE)
    monkeypatch.setenv("FAKE_SETTING", "before")
    monkeypatch.delenv("APP_NAME", raising=False)
    sentinel = object()
    monkeypatch.setitem(sys.modules, "my_app", sentinel)
    loaded = load_app_file(app_file, {"FAKE_SETTING": "during", "APP_NAME": "x-app"})
    assert loaded.module.SEEN == "during"
    assert loaded.app.name == "x-app"
    assert isinstance(loaded.handle(ModalTarget("a")), modal.Function)
    assert os.environ["FAKE_SETTING"] == "before"
    assert "APP_NAME" not in os.environ
    assert sys.modules["my_app"] is sentinel  # registered only while importing
    with pytest.raises(ConfigError, match=r"no @modal\.web_server function named 'other'"):
        loaded.handle(ModalTarget("a", "other"))
    with pytest.raises(ConfigError, match=r"@app\.server class named 'Srv'"):
        loaded.handle(ModalTarget("a", None, "Srv"))
    # A second import is a fresh module with its own settings.
    again = load_app_file(app_file, {"FAKE_SETTING": "second"})
    assert again.module is not loaded.module
    assert again.module.SEEN == "second"
    assert again.app.name == "default-name"


def test_load_app_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_app_file(tmp_path / "missing.py", {})
    no_app = tmp_path / "no_app.py"
    no_app.write_text("X = 1\n")
    with pytest.raises(ConfigError, match=r"defines no modal\.App"):
        load_app_file(no_app, {})
    broken = tmp_path / "broken.py"
    broken.write_text("import os\nraise ValueError(os.environ['BAD'])\n")
    with pytest.raises(ConfigError, match=r"failed to import.*ValueError: oops"):
        load_app_file(broken, {"BAD": "oops"})
    assert "BAD" not in os.environ
    assert "broken" not in sys.modules


def test_bad_deploy_env_for_the_bundled_app_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FAST_BOOT"):
        load_app_file(bundled_app_file(), {"FAST_BOOT": "maybe"})
    # Rejected while importing, before any Modal call: deploy says the same.
    with pytest.raises(ConfigError, match="FAST_BOOT"):
        ModalSDK().deploy(bundled_app_file(), {"FAST_BOOT": "maybe"}, ModalTarget("x"), "fp")


# ---------------------------------------------------------------- the wiring, SDK stubbed
# The calls past authentication need Modal's cloud; stubbing the SDK methods checks how the
# adapter drives them (arguments, output, stopping on Ctrl-C) without it.


@pytest.fixture
def stubbed_sdk(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Modal's network calls replaced by recorders; each records whether Modal's output (the
    build log, container logs) was switched on while it ran."""
    import contextlib

    import modal
    from modal._output.manager import OutputManager

    events: list[tuple[str, Any]] = []

    def output_on() -> bool:
        return bool(OutputManager.get().is_enabled)

    def deploy(self: Any, *, name: str, environment_name: str | None) -> Any:
        events.append(("deploy", (self.name, name, environment_name, output_on())))
        return self

    @contextlib.contextmanager
    def run(self: Any, *, environment_name: str | None = None) -> Any:
        events.append(("run_enter", (self.name, environment_name, output_on())))
        try:
            yield self
        except KeyboardInterrupt:
            # Like Modal's own run context: a Ctrl-C handed in is swallowed.
            events.append(("run_swallowed", None))
            return
        events.append(("run_exit", None))

    monkeypatch.setattr(modal.App, "deploy", deploy)
    monkeypatch.setattr(modal.App, "run", run)
    monkeypatch.setattr(modal.App, "get_tags", lambda self: {"team": "ml"})
    monkeypatch.setattr(modal.App, "set_tags", lambda self, tags: events.append(("tags", tags)))
    monkeypatch.setattr(modal.Function, "get_web_url", lambda self: "https://w--app.modal.run/")
    return events


def test_deploy_imports_with_deploy_env_deploys_by_name_with_output_and_tags(
    stubbed_sdk: list[tuple[str, Any]],
) -> None:
    target = ModalTarget("my-app", environment="dev")
    ModalSDK().deploy(bundled_app_file(), {"APP_NAME": "from-env"}, target, "f" * 32)
    assert stubbed_sdk == [
        ("deploy", ("from-env", "my-app", "dev", True)),
        # The fingerprint joins the app's tags (the others are kept).
        ("tags", {"team": "ml", FINGERPRINT_TAG: "f" * 32}),
    ]


def test_ephemeral_yields_the_local_url_and_stops(stubbed_sdk: list[tuple[str, Any]]) -> None:
    sdk = ModalSDK()
    target = ModalTarget("eph", environment="dev")
    with sdk.ephemeral(bundled_app_file(), {"APP_NAME": "eph"}, target) as url:
        assert url == "https://w--app.modal.run"
        # Autoscaler calls for this app use the local handle: it cannot be looked up by name.
        assert target in sdk._ephemeral_handles
    # Modal's output is on for the whole run: the build, then the container's logs.
    assert stubbed_sdk == [("run_enter", ("eph", "dev", True)), ("run_exit", None)]
    assert sdk._ephemeral_handles == {}


def test_ephemeral_lets_ctrl_c_through(stubbed_sdk: list[tuple[str, Any]]) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        ModalSDK().ephemeral(bundled_app_file(), {"APP_NAME": "eph"}, ModalTarget("eph")),
    ):
        raise KeyboardInterrupt
    # The run was closed normally (stopping the app), and Ctrl-C was not swallowed.
    assert stubbed_sdk == [("run_enter", ("eph", None, True)), ("run_exit", None)]


def test_ephemeral_with_an_unknown_function_fails_before_running(
    stubbed_sdk: list[tuple[str, Any]],
) -> None:
    with (
        pytest.raises(ConfigError, match="'nope'"),
        ModalSDK().ephemeral(bundled_app_file(), {}, ModalTarget("x", "nope")),
    ):
        pass
    assert stubbed_sdk == []


def test_locate_a_server_uses_get_url(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    seen: list[str | None] = []

    def get_url(self: Any) -> str:
        seen.append(type(self).__name__)
        return "https://w--app-srv.modal.run"

    monkeypatch.setattr(modal.Server, "get_url", get_url)
    assert (
        ModalSDK().locate(ModalTarget("app", None, "Srv", "dev")) == "https://w--app-srv.modal.run"
    )
    assert seen == ["Server"]


class _Manager:
    def __init__(self, stored: tuple[int | None, int | None], log: list[Any]) -> None:
        self.stored, self.log = stored, log

    def settings(self) -> Any:
        minimum, window = self.stored
        return type("Settings", (), {"min_containers": minimum, "scaledown_window": window})()

    def update(self, **changes: Any) -> None:
        self.log.append(("autoscaler.update", changes))


class _Handle:
    def __init__(self, manager: _Manager, log: list[Any]) -> None:
        self.autoscaler = manager
        self.log = log


@pytest.mark.parametrize(
    ("stored", "read"),
    [((None, None), (0, None)), ((0, 300), (0, 300)), ((2, 60), (2, 60))],
)
def test_autoscaler_reads_and_updates_through_autoscaler_manager(
    monkeypatch: pytest.MonkeyPatch, stored: tuple[int | None, int | None], read: tuple[int, int]
) -> None:
    import modal

    from pytest_modal_vllm.modal_sdk import Autoscaler

    log: list[Any] = []
    lookups: list[tuple[Any, ...]] = []

    def from_name(app: str, name: str, *, environment_name: str | None = None) -> _Handle:
        lookups.append((app, name, environment_name))
        return _Handle(_Manager(stored, log), log)

    monkeypatch.setattr(modal.Function, "from_name", from_name)
    sdk = ModalSDK()
    target = ModalTarget("app", environment="dev")
    assert sdk.autoscaler(target) == Autoscaler(*read)
    sdk.update_autoscaler(target, min_containers=1)
    sdk.update_autoscaler(target, scaledown_window=2)
    # Only what is given is sent: an omitted setting stays as it is (None would mean 0).
    assert log == [
        ("autoscaler.update", {"min_containers": 1}),
        ("autoscaler.update", {"scaledown_window": 2}),
    ]
    assert lookups == [("app", "serve", "dev")] * 3


def test_leases_use_the_apps_named_dict(monkeypatch: pytest.MonkeyPatch) -> None:
    import modal

    opened: list[tuple[Any, ...]] = []
    store: dict[str, Any] = {}

    class Dict:
        def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
            if skip_if_exists and key in store:
                return False
            store[key] = value
            return True

        def get(self, key: str) -> Any:
            return store.get(key)

        def pop(self, key: str, default: Any) -> Any:
            return store.pop(key, default)

        def items(self) -> Any:
            yield from list(store.items())

    def from_name(name: str, *, environment_name: str | None, create_if_missing: bool) -> Dict:
        opened.append((name, environment_name, create_if_missing))
        return Dict()

    monkeypatch.setattr(modal.Dict, "from_name", from_name)
    leases = ModalSDK().leases(ModalTarget("my-app", environment="dev"))
    assert leases.put("a", 1, skip_if_exists=True) is True
    assert leases.put("a", 2, skip_if_exists=True) is False  # the atomic create
    assert leases.get("a") == 1
    assert leases.items() == [("a", 1)]
    assert leases.pop("a") == 1
    assert leases.pop("a") is None
    assert opened == [("modal-vllm-leases-my-app", "dev", True)]  # opened once, created if new


def test_status_reads_the_control_plane_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` calls what wakes nothing: the URL, `get_current_stats`, `info`, the tags."""
    import modal

    called: list[str] = []

    class Function:
        def get_web_url(self) -> str:
            called.append("get_web_url")
            return "https://w--app.modal.run"

        def get_current_stats(self) -> Any:
            called.append("get_current_stats")
            return type("Stats", (), {"num_total_runners": 0, "backlog": 3})()

        def info(self) -> Any:
            called.append("info")
            web = type("Web", (), {"unauthenticated": True})()
            return type("Info", (), {"web_info": web})()

    class App:
        def get_tags(self) -> dict[str, str]:
            called.append("get_tags")
            return {FINGERPRINT_TAG: "ab" * 16}

    monkeypatch.setattr(modal.Function, "from_name", lambda *a, **k: Function())
    monkeypatch.setattr(modal.App, "lookup", lambda *a, **k: App())
    found = ModalSDK().status(ModalTarget("app"))
    assert (found.deployed, found.url, found.containers, found.backlog) == (
        True,
        "https://w--app.modal.run",
        0,
        3,
    )
    assert found.proxy_auth is False  # unauthenticated: strangers can wake it
    assert found.fingerprint == "ab" * 16
    assert called == ["get_web_url", "get_current_stats", "info", "get_tags"]
