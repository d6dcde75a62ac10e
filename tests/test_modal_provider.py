"""ModalProvider against the fake Modal adapter and emulators: locate, deploy only when needed,
ephemeral runs, proxy auth, status without waking, the autoscaler pin."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_modal import FakeModal, read_calls, read_state
from modal_emulator import ModalEmulator

from pytest_modal_vllm.errors import ConfigError, SettingUnreadable, UnavailableError
from pytest_modal_vllm.modal_sdk import (
    ModalTarget,
    NotDeployedError,
    bundled_app_file,
    fingerprint,
)
from pytest_modal_vllm.platforms import Platform
from pytest_modal_vllm.providers.modal import ModalProvider
from pytest_modal_vllm.resolution import ResolvedPlatform, resolve_platform
from pytest_modal_vllm.settings import resolve


class Modal:
    """The fake adapter, its files, and the emulators that stand for the deployed targets."""

    def __init__(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: Callable[..., ModalEmulator]
    ) -> None:
        self.tmp_path, self.monkeypatch, self.start = tmp_path, monkeypatch, start
        self.urls: dict[str, str] = {}
        self.sdk = FakeModal()

    def serve(self, target: str = "my-app/serve", **behaviour: Any) -> ModalEmulator:
        """An emulator for `app/function` (scaled to zero, as after idle)."""
        server = self.start(**behaviour)
        server.scale_to_zero()
        self.urls[target] = server.root_url
        self.monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps(self.urls))
        return server

    def calls(self) -> list[dict[str, Any]]:
        return read_calls(self.tmp_path / "calls.jsonl")

    def names(self) -> list[str]:
        return [call["call"] for call in self.calls()]

    def updates(self) -> list[int]:
        return [c["min_containers"] for c in self.calls() if c["call"] == "update_autoscaler"]


@pytest.fixture
def modal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint_server: Callable[..., ModalEmulator]
) -> Modal:
    monkeypatch.setenv("FAKE_MODAL_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_MODAL_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("FAKE_MODAL_URLS", "{}")
    for name in ("FAKE_MODAL_DEPLOYED", "FAKE_MODAL_FAIL", "FAKE_MODAL_NO_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for name in ("VLLM_API_KEY", "MODAL_PROXY_TOKEN_ID", "MODAL_PROXY_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return Modal(tmp_path, monkeypatch, endpoint_server)


def platform(*, deploy: bool = False, ephemeral: bool = False, **fields: Any) -> ResolvedPlatform:
    """A modal platform resolved for a run with `--vllm-deploy`/`--vllm-ephemeral` or not."""
    values: dict[str, Any] = {"name": "m", "kind": "modal", "app": "my-app"}
    values.update(fields)
    settings = resolve({"deploy": deploy, "ephemeral": ephemeral}, {}, {})
    return resolve_platform(Platform(**values), settings)


def provider(modal: Modal, **fields: Any) -> ModalProvider:
    return ModalProvider(platform(**fields), sdk=modal.sdk)


# ---------------------------------------------------------------- locate


def test_locate_gives_the_base_url_and_says_whether_a_cold_start_comes(
    modal: Modal, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = modal.serve()
    monkeypatch.setenv("VLLM_API_KEY", "sk-1")
    resolved = platform()
    located = ModalProvider(resolved, sdk=modal.sdk)
    assert located.start() == f"{server.root_url}/v1"
    assert located.wake_note == "no container running: a cold start is expected"
    assert resolved.api_key == "sk-1"
    assert dict(resolved.headers) == {}
    target = {"app": "my-app", "function": "serve", "server": None, "environment": None}
    assert modal.calls() == [{"call": "status", **target}]
    assert server.stats.cold_starts == 1  # its own first boot only: locating woke nothing
    httpx.get(f"{server.root_url}/health", timeout=10)  # demand: a container boots
    assert server.wait_ready(5)
    warm = provider(modal)
    warm.start()
    assert warm.wake_note == "1 container running"


def test_locate_passes_function_server_and_environment(modal: Modal) -> None:
    modal.serve("my-app/web")
    srv = modal.serve("my-app/Srv")
    provider(modal, function="web", environment="dev").start()
    assert provider(modal, server="Srv").start() == f"{srv.root_url}/v1"
    located = modal.calls()
    assert located[0] == {
        "call": "status",
        "app": "my-app",
        "function": "web",
        "server": None,
        "environment": "dev",
    }
    # A server replaces the default function `serve`.
    assert (located[1]["function"], located[1]["server"]) == (None, "Srv")


def test_not_deployed_is_a_config_error_with_the_deploy_hint(modal: Modal) -> None:
    with pytest.raises(NotDeployedError) as caught:
        provider(modal, name="modal-llama", app="nowhere").start()
    error = caught.value
    assert isinstance(error, ConfigError)
    assert error.exit_code == 4
    text = str(error)
    assert text.startswith("vllm platform 'modal-llama': ")
    assert "'nowhere'" in text
    assert "not deployed" in text
    assert "modal-vllm deploy modal-llama" in text
    assert "--vllm-deploy" in text


def test_missing_credentials_are_a_config_error(
    modal: Modal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODAL_NO_AUTH", "1")
    with pytest.raises(ConfigError) as caught:
        provider(modal).start()
    text = str(caught.value)
    assert text.startswith("vllm platform 'm': ")
    for hint in ("modal setup", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        assert hint in text


def test_api_failure_is_unavailable(modal: Modal, monkeypatch: pytest.MonkeyPatch) -> None:
    modal.serve()
    monkeypatch.setenv("FAKE_MODAL_FAIL", "status")
    with pytest.raises(UnavailableError) as caught:
        provider(modal).start()
    assert caught.value.platform == "m"


def test_failure_is_always_none(modal: Modal) -> None:
    modal.serve()
    located = provider(modal)
    located.start()
    assert located.failure() is None


# ---------------------------------------------------------------- deploy


def test_deploy_then_locate_with_deploy_env_and_app_name(
    modal: Modal, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = modal.serve()
    monkeypatch.setenv("FAKE_MODAL_DEPLOYED", "")  # nothing deployed yet
    deployed = provider(
        modal, deploy_env={"MODEL_NAME": "Org/M", "GPU": "L4"}, environment="dev", deploy=True
    )
    assert deployed.start() == f"{server.root_url}/v1"
    status, deploy, located = modal.calls()
    assert status["call"] == "status"
    assert deploy == {
        "call": "deploy",
        "app_file": str(bundled_app_file()),
        # APP_NAME follows the platform's app, so deployed and looked-up names agree.
        "deploy_env": {"MODEL_NAME": "Org/M", "GPU": "L4", "APP_NAME": "my-app"},
        "app_name": "my-app",
        "environment": "dev",
    }
    assert located["call"] == "status"
    assert deployed.notes == ["deployed app 'my-app'"]
    tags = read_state(modal.tmp_path / "state.json")["tags"]
    assert tags == {"my-app": fingerprint(bundled_app_file(), deploy["deploy_env"])}


def test_a_second_deploy_with_the_same_settings_is_skipped(modal: Modal) -> None:
    server = modal.serve()
    provider(modal, deploy=True).start()
    assert server.stats.snapshot()["deploys"] == 1  # the redeploy drained the container
    again = provider(modal, deploy=True)
    again.start()
    assert modal.names().count("deploy") == 1
    assert server.stats.snapshot()["deploys"] == 1
    assert again.notes == [
        "app 'my-app' is already deployed with these settings: not redeployed "
        "(`modal-vllm deploy m --force` redeploys)"
    ]
    changed = provider(modal, deploy=True, deploy_env={"GPU": "L4"})
    changed.start()
    assert modal.names().count("deploy") == 2  # other settings: deployed
    forced = provider(modal, deploy_env={"GPU": "L4"})
    forced.deploy(force=True)
    assert modal.names().count("deploy") == 3


def test_relative_modal_app_resolves_against_the_current_directory(
    modal: Modal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    modal.serve()
    work = tmp_path / "work"
    (work / "apps").mkdir(parents=True)
    (work / "apps" / "server.py").write_text("# app\n")
    monkeypatch.chdir(work)
    provider(modal, modal_app="apps/server.py", deploy=True).start()
    deploy = next(call for call in modal.calls() if call["call"] == "deploy")
    assert deploy["app_file"] == str(work / "apps" / "server.py")


def test_without_deploy_nothing_is_deployed(modal: Modal) -> None:
    modal.serve()
    provider(modal).start()
    assert modal.names() == ["status"]


def test_deploy_and_ephemeral_exclude_each_other(modal: Modal) -> None:
    with pytest.raises(ConfigError, match="--vllm-deploy and --vllm-ephemeral"):
        provider(modal, deploy=True, ephemeral=True).start()
    assert modal.names() == []


def test_cli_deploy_status_and_stop(modal: Modal, monkeypatch: pytest.MonkeyPatch) -> None:
    server = modal.serve()
    monkeypatch.setenv("FAKE_MODAL_DEPLOYED", "")
    app = provider(modal)
    assert app.status()[0] == "deployed: no"
    assert app.deploy().url == server.root_url
    assert app.status()[:3] == [
        "deployed: yes",
        f"url: {server.root_url}/v1",
        "containers: 0 running, 0 queued",
    ]
    assert app.stop_app() is True
    assert app.stop_app() is False
    assert app.status()[0] == "deployed: no"


def test_status_asks_health_only_when_a_container_is_up(modal: Modal) -> None:
    server = modal.serve()
    boots = server.stats.cold_starts
    lines = provider(modal).status()
    assert "containers: 0 running, 0 queued" in lines
    assert "answers /health now: not asked (no container is up; asking starts one)" in lines
    assert server.stats.cold_starts == boots  # status caused no cold start
    assert server.stats.snapshot()["requests"] == {}
    httpx.get(f"{server.base_url}/models", timeout=10)  # demand: a container boots
    assert server.wait_ready(5)
    lines = provider(modal).status()
    assert "containers: 1 running, 0 queued" in lines
    assert "answers /health now: yes" in lines


def test_status_warns_when_strangers_can_wake_the_gpu(modal: Modal) -> None:
    modal.serve()
    lines = provider(modal).status()
    assert any(line.startswith("WARNING: proxy auth is off") for line in lines)
    modal.serve(proxy_auth=("wk-1", "ws-1"))
    env = {"MODAL_PROXY_TOKEN_ID": "wk-1", "MODAL_PROXY_TOKEN_SECRET": "ws-1"}
    for name, value in env.items():
        modal.monkeypatch.setenv(name, value)
    guarded = provider(modal, proxy_auth=True).status()
    assert not any("proxy auth is off" in line for line in guarded)


# ---------------------------------------------------------------- ephemeral


def test_ephemeral_runs_until_stop(modal: Modal, capsys: pytest.CaptureFixture[str]) -> None:
    server = modal.serve()
    run = provider(modal, deploy_env={"GPU": "L4"}, ephemeral=True)
    assert run.start() == f"{server.root_url}/v1"
    assert run.wake_note == "ephemeral app: a cold start is expected"
    assert modal.names() == ["ephemeral_enter"]
    entered = modal.calls()[0]
    assert entered["deploy_env"] == {"GPU": "L4", "APP_NAME": "my-app"}
    assert (entered["function"], entered["server"]) == ("serve", None)
    run.stop()
    assert modal.names() == ["ephemeral_enter", "ephemeral_exit"]
    assert modal.calls()[1]["error"] is None
    run.stop()  # idempotent
    assert modal.names() == ["ephemeral_enter", "ephemeral_exit"]


def test_ephemeral_is_exited_when_the_session_fails(modal: Modal) -> None:
    modal.serve()
    run = provider(modal, ephemeral=True)

    def session() -> None:
        try:
            run.start()
            raise RuntimeError("boom")  # e.g. the wake or a test session crashing
        finally:
            run.stop()

    with pytest.raises(RuntimeError, match="boom"):
        session()
    assert modal.names() == ["ephemeral_enter", "ephemeral_exit"]


def test_ephemeral_context_records_an_exception_inside_it(modal: Modal) -> None:
    modal.serve()
    with (
        pytest.raises(KeyboardInterrupt),
        modal.sdk.ephemeral(Path("app.py"), {"APP_NAME": "my-app"}, ModalTarget("my-app")),
    ):
        raise KeyboardInterrupt
    assert modal.calls()[-1]["call"] == "ephemeral_exit"
    assert modal.calls()[-1]["error"] == "KeyboardInterrupt"


def test_stop_after_a_failed_start_is_safe(modal: Modal) -> None:
    run = provider(modal, app="nowhere", ephemeral=True)
    with pytest.raises(NotDeployedError):
        run.start()
    run.stop()
    run.stop()


# ---------------------------------------------------------------- proxy auth


def test_proxy_auth_sends_headers_and_deploys_an_app_that_demands_them(
    modal: Modal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODAL_PROXY_TOKEN_ID", "wk-id")
    monkeypatch.setenv("MODAL_PROXY_TOKEN_SECRET", "ws-secret")
    resolved = platform(proxy_auth=True)
    assert dict(resolved.headers) == {"Modal-Key": "wk-id", "Modal-Secret": "ws-secret"}
    assert "ws-secret" not in repr(resolved)
    # One switch: the deployed app demands what the platform sends.
    assert resolved.deploy_env["PROXY_AUTH"] == "1"
    assert "PROXY_AUTH" not in platform().deploy_env


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ({}, ["MODAL_PROXY_TOKEN_ID", "MODAL_PROXY_TOKEN_SECRET"]),
        ({"MODAL_PROXY_TOKEN_ID": "wk"}, ["MODAL_PROXY_TOKEN_SECRET"]),
        ({"MODAL_PROXY_TOKEN_SECRET": "ws"}, ["MODAL_PROXY_TOKEN_ID"]),
    ],
)
def test_missing_proxy_token_names_the_variables_before_any_deploy(
    modal: Modal,
    monkeypatch: pytest.MonkeyPatch,
    present: dict[str, str],
    missing: list[str],
) -> None:
    for key, value in present.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as caught:  # raised by the resolution, before any start
        provider(modal, proxy_auth=True, deploy=True).start()
    text = str(caught.value)
    for name in missing:
        assert name in text
    assert "proxy_auth" in text
    assert modal.names() == []  # nothing deployed for a session that cannot authenticate


# ---------------------------------------------------------------- autoscaler pin


def test_pin_sets_one_and_unpin_restores_zero(modal: Modal) -> None:
    server = modal.serve()
    app = provider(modal)
    app.pin()
    assert app.pinned
    assert server.autoscaler()["min_containers"] == 1
    app.unpin()
    assert not app.pinned
    assert server.autoscaler()["min_containers"] == 0
    assert modal.updates() == [1, 0]


def test_an_already_warm_function_is_left_alone(modal: Modal) -> None:
    server = modal.serve(min_containers=3)
    app = provider(modal)
    app.pin()
    app.unpin()
    # Pinning to 1 would have lowered it; restoring would have been a no-op at best.
    assert server.autoscaler()["min_containers"] == 3
    assert modal.names() == ["autoscaler"]


def test_an_unreadable_value_is_never_written(modal: Modal) -> None:
    server = modal.serve(min_containers=2, autoscaler_unreadable=True)
    app = provider(modal)
    with pytest.raises(SettingUnreadable) as caught:
        app.pin()
    assert "could not be read" in str(caught.value)
    assert not app.pinned
    app.unpin()
    assert modal.updates() == []  # not pinned to 1, not "restored" to a guessed 0
    assert server.autoscaler()["min_containers"] == 2


def test_unpin_is_idempotent_and_safe_without_pin(modal: Modal) -> None:
    modal.serve()
    app = provider(modal)
    app.unpin()  # never pinned
    assert modal.names() == []
    app.pin()
    app.pin()  # a second pin does not overwrite the value to restore
    app.unpin()
    app.unpin()
    assert modal.updates() == [1, 0]


def test_pin_targets_the_server_when_set(modal: Modal) -> None:
    server = modal.serve("my-app/Srv")
    app = provider(modal, server="Srv", environment="dev")
    app.pin()
    assert server.autoscaler()["min_containers"] == 1
    app.unpin()
    update = next(c for c in modal.calls() if c["call"] == "update_autoscaler")
    assert (update["function"], update["server"], update["environment"]) == (None, "Srv", "dev")


def test_a_failed_restore_is_reported_once(modal: Modal, monkeypatch: pytest.MonkeyPatch) -> None:
    modal.serve()
    app = provider(modal)
    app.pin()
    monkeypatch.setenv("FAKE_MODAL_FAIL", "update_autoscaler")
    with pytest.raises(UnavailableError) as caught:
        app.unpin()
    assert caught.value.platform == "m"
    app.unpin()  # not retried, not raised again


def test_pin_errors_are_attributed(modal: Modal, monkeypatch: pytest.MonkeyPatch) -> None:
    modal.serve()
    app = provider(modal)
    monkeypatch.setenv("FAKE_MODAL_FAIL", "update_autoscaler")
    with pytest.raises(UnavailableError) as caught:
        app.pin()
    assert caught.value.platform == "m"
    assert not app.pinned


def test_unpin_after_the_ephemeral_app_stopped_does_nothing(modal: Modal) -> None:
    modal.serve()
    run = provider(modal, ephemeral=True)
    run.start()
    run.pin()
    run.stop()
    run.unpin()
    assert modal.updates() == [1]
