"""ModalProvider against the fake Modal adapter: locate, deploy, ephemeral, proxy auth, pin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fake_modal import FakeModal, read_calls, read_state

from pytest_modal_vllm.errors import ConfigError, UnavailableError
from pytest_modal_vllm.modal_sdk import ModalTarget, NotDeployedError, bundled_app_file
from pytest_modal_vllm.platforms import Platform
from pytest_modal_vllm.providers.modal import ModalProvider
from pytest_modal_vllm.resolution import ResolvedPlatform, resolve_platform
from pytest_modal_vllm.settings import resolve

URL = "http://127.0.0.1:8765"


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeModal:
    monkeypatch.setenv("FAKE_MODAL_CALLS", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_MODAL_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps({"my-app/serve": URL}))
    for name in ("FAKE_MODAL_DEPLOYED", "FAKE_MODAL_FAIL", "FAKE_MODAL_NO_AUTH"):
        monkeypatch.delenv(name, raising=False)
    for name in ("VLLM_API_KEY", "MODAL_PROXY_TOKEN_ID", "MODAL_PROXY_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return FakeModal()


def platform(*, deploy: bool = False, ephemeral: bool = False, **fields: Any) -> ResolvedPlatform:
    """A modal platform resolved for a run with `--vllm-deploy`/`--vllm-ephemeral` or not."""
    values: dict[str, Any] = {"name": "m", "kind": "modal", "app": "my-app"}
    values.update(fields)
    settings = resolve({"deploy": deploy, "ephemeral": ephemeral}, {}, {})
    return resolve_platform(Platform(**values), settings)


def calls(tmp_path: Path) -> list[dict[str, Any]]:
    return read_calls(tmp_path / "calls.jsonl")


def names(tmp_path: Path) -> list[str]:
    return [call["call"] for call in calls(tmp_path)]


# ---------------------------------------------------------------- locate


def test_locate_gives_base_url_key_and_no_headers(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-1")
    resolved = platform()
    assert ModalProvider(resolved, sdk=fake).start() == f"{URL}/v1"
    assert resolved.api_key == "sk-1"
    assert dict(resolved.headers) == {}
    assert calls(tmp_path) == [
        {
            "call": "locate",
            "app": "my-app",
            "function": "serve",
            "server": None,
            "environment": None,
        }
    ]


def test_locate_passes_function_server_and_environment(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_MODAL_URLS", json.dumps({"my-app/web": URL, "my-app/Srv": URL + "/"}))
    ModalProvider(platform(function="web", environment="dev"), sdk=fake).start()
    url = ModalProvider(platform(server="Srv"), sdk=fake).start()
    assert url == f"{URL}/v1"  # trailing slash of the SDK's URL dropped
    located = [c for c in calls(tmp_path) if c["call"] == "locate"]
    assert located[0] == {
        "call": "locate",
        "app": "my-app",
        "function": "web",
        "server": None,
        "environment": "dev",
    }
    # A server replaces the default function `serve`.
    assert (located[1]["function"], located[1]["server"]) == (None, "Srv")


def test_not_deployed_is_a_config_error_with_the_deploy_hint(fake: FakeModal) -> None:
    provider = ModalProvider(platform(name="modal-llama", app="nowhere"), sdk=fake)
    with pytest.raises(NotDeployedError) as caught:
        provider.start()
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
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODAL_NO_AUTH", "1")
    with pytest.raises(ConfigError) as caught:
        ModalProvider(platform(), sdk=fake).start()
    text = str(caught.value)
    assert text.startswith("vllm platform 'm': ")
    for hint in ("modal setup", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        assert hint in text


def test_api_failure_is_unavailable(fake: FakeModal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODAL_FAIL", "locate")
    with pytest.raises(UnavailableError) as caught:
        ModalProvider(platform(), sdk=fake).start()
    assert caught.value.platform == "m"


def test_failure_is_always_none(fake: FakeModal) -> None:
    provider = ModalProvider(platform(), sdk=fake)
    provider.start()
    assert provider.failure() is None


# ---------------------------------------------------------------- deploy


def test_deploy_then_locate_with_deploy_env_and_app_name(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_MODAL_DEPLOYED", "")  # nothing deployed yet
    provider = ModalProvider(
        platform(deploy_env={"MODEL_NAME": "Org/M", "GPU": "L4"}, environment="dev", deploy=True),
        sdk=fake,
    )
    assert provider.start() == f"{URL}/v1"
    deploy, locate = calls(tmp_path)
    assert deploy == {
        "call": "deploy",
        "app_file": str(bundled_app_file()),
        # APP_NAME follows the platform's app, so deployed and looked-up names agree.
        "deploy_env": {"MODEL_NAME": "Org/M", "GPU": "L4", "APP_NAME": "my-app"},
        "app_name": "my-app",
        "environment": "dev",
    }
    assert locate["call"] == "locate"


def test_relative_modal_app_resolves_against_the_current_directory(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ModalProvider(platform(modal_app="apps/server.py", deploy=True), sdk=fake).start()
    assert calls(tmp_path)[0]["app_file"] == str(work / "apps" / "server.py")


def test_without_deploy_nothing_is_deployed(fake: FakeModal, tmp_path: Path) -> None:
    ModalProvider(platform(), sdk=fake).start()
    assert names(tmp_path) == ["locate"]


def test_deploy_and_ephemeral_exclude_each_other(fake: FakeModal, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--vllm-deploy and --vllm-ephemeral"):
        ModalProvider(platform(deploy=True, ephemeral=True), sdk=fake).start()
    assert names(tmp_path) == []


def test_cli_deploy_status_and_stop(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_MODAL_DEPLOYED", "")
    provider = ModalProvider(platform(), sdk=fake)
    assert provider.status()[0] == "deployed: no"
    assert provider.deploy() == URL
    assert provider.status()[:2] == ["deployed: yes", f"url: {URL}/v1"]
    assert provider.stop_app() is True
    assert provider.stop_app() is False
    assert provider.status()[0] == "deployed: no"


# ---------------------------------------------------------------- ephemeral


def test_ephemeral_runs_until_stop(fake: FakeModal, tmp_path: Path) -> None:
    provider = ModalProvider(platform(deploy_env={"GPU": "L4"}, ephemeral=True), sdk=fake)
    assert provider.start() == f"{URL}/v1"
    assert names(tmp_path) == ["ephemeral_enter"]
    entered = calls(tmp_path)[0]
    assert entered["deploy_env"] == {"GPU": "L4", "APP_NAME": "my-app"}
    assert (entered["function"], entered["server"]) == ("serve", None)
    provider.stop()
    assert names(tmp_path) == ["ephemeral_enter", "ephemeral_exit"]
    assert calls(tmp_path)[1]["error"] is None
    provider.stop()  # idempotent
    assert names(tmp_path) == ["ephemeral_enter", "ephemeral_exit"]


def test_ephemeral_is_exited_when_the_session_fails(fake: FakeModal, tmp_path: Path) -> None:
    provider = ModalProvider(platform(ephemeral=True), sdk=fake)

    def session() -> None:
        try:
            provider.start()
            raise RuntimeError("boom")  # e.g. the wake or a test session crashing
        finally:
            provider.stop()

    with pytest.raises(RuntimeError, match="boom"):
        session()
    assert names(tmp_path) == ["ephemeral_enter", "ephemeral_exit"]


def test_ephemeral_context_records_an_exception_inside_it(fake: FakeModal, tmp_path: Path) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        fake.ephemeral(Path("app.py"), {"APP_NAME": "my-app"}, ModalTarget("my-app")),
    ):
        raise KeyboardInterrupt
    assert calls(tmp_path)[-1]["call"] == "ephemeral_exit"
    assert calls(tmp_path)[-1]["error"] == "KeyboardInterrupt"


def test_stop_after_a_failed_start_is_safe(fake: FakeModal) -> None:
    provider = ModalProvider(platform(app="nowhere", ephemeral=True), sdk=fake)
    with pytest.raises(NotDeployedError):
        provider.start()
    provider.stop()
    provider.stop()


# ---------------------------------------------------------------- proxy auth


def test_proxy_auth_adds_modal_headers(fake: FakeModal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_PROXY_TOKEN_ID", "wk-id")
    monkeypatch.setenv("MODAL_PROXY_TOKEN_SECRET", "ws-secret")
    resolved = platform(proxy_auth=True)
    assert dict(resolved.headers) == {"Modal-Key": "wk-id", "Modal-Secret": "ws-secret"}
    assert "ws-secret" not in repr(resolved)


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ({}, ["MODAL_PROXY_TOKEN_ID", "MODAL_PROXY_TOKEN_SECRET"]),
        ({"MODAL_PROXY_TOKEN_ID": "wk"}, ["MODAL_PROXY_TOKEN_SECRET"]),
        ({"MODAL_PROXY_TOKEN_SECRET": "ws"}, ["MODAL_PROXY_TOKEN_ID"]),
    ],
)
def test_missing_proxy_token_names_the_variables_before_any_deploy(
    fake: FakeModal,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    present: dict[str, str],
    missing: list[str],
) -> None:
    for key, value in present.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as caught:  # raised by the resolution, before any start
        ModalProvider(platform(proxy_auth=True, deploy=True), sdk=fake).start()
    text = str(caught.value)
    for name in missing:
        assert name in text
    assert "proxy_auth" in text
    assert names(tmp_path) == []  # nothing deployed for a session that cannot authenticate


# ---------------------------------------------------------------- autoscaler pin


def test_pin_sets_one_and_unpin_restores_zero(fake: FakeModal, tmp_path: Path) -> None:
    provider = ModalProvider(platform(), sdk=fake)
    provider.pin()
    assert provider.pinned
    assert read_state(tmp_path / "state.json")["min_containers"] == {"my-app/serve": 1}
    provider.unpin()
    assert not provider.pinned
    assert read_state(tmp_path / "state.json")["min_containers"] == {"my-app/serve": 0}
    updates = [c["min_containers"] for c in calls(tmp_path) if c["call"] == "update_autoscaler"]
    assert updates == [1, 0]


def test_unpin_restores_the_value_read_before(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"min_containers": {"my-app/serve": 0}}))
    provider = ModalProvider(platform(), sdk=fake)
    provider.pin()
    provider.unpin()
    assert read_state(state)["min_containers"]["my-app/serve"] == 0
    assert names(tmp_path) == ["get_min_containers", "update_autoscaler", "update_autoscaler"]


def test_an_already_warm_function_is_left_alone(fake: FakeModal, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"min_containers": {"my-app/serve": 3}}))
    provider = ModalProvider(platform(), sdk=fake)
    provider.pin()
    provider.unpin()
    # Pinning to 1 would have lowered it; restoring would have been a no-op at best.
    assert read_state(state)["min_containers"]["my-app/serve"] == 3
    assert names(tmp_path) == ["get_min_containers"]


def test_unreadable_min_containers_restores_zero(fake: FakeModal, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"min_containers": {"my-app/serve": None}}))
    provider = ModalProvider(platform(), sdk=fake)
    provider.pin()
    assert read_state(state)["min_containers"]["my-app/serve"] == 1
    provider.unpin()
    assert read_state(state)["min_containers"]["my-app/serve"] == 0


def test_unpin_is_idempotent_and_safe_without_pin(fake: FakeModal, tmp_path: Path) -> None:
    provider = ModalProvider(platform(), sdk=fake)
    provider.unpin()  # never pinned
    assert names(tmp_path) == []
    provider.pin()
    provider.pin()  # a second pin does not overwrite the value to restore
    provider.unpin()
    provider.unpin()
    updates = [c["min_containers"] for c in calls(tmp_path) if c["call"] == "update_autoscaler"]
    assert updates == [1, 0]


def test_pin_targets_the_server_when_set(fake: FakeModal, tmp_path: Path) -> None:
    provider = ModalProvider(platform(server="Srv", environment="dev"), sdk=fake)
    provider.pin()
    provider.unpin()
    update = next(c for c in calls(tmp_path) if c["call"] == "update_autoscaler")
    assert (update["function"], update["server"], update["environment"]) == (None, "Srv", "dev")
    assert read_state(tmp_path / "state.json")["min_containers"] == {"my-app/Srv": 0}


def test_a_failed_restore_is_reported_once(
    fake: FakeModal, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    provider = ModalProvider(platform(), sdk=fake)
    provider.pin()
    monkeypatch.setenv("FAKE_MODAL_FAIL", "update_autoscaler")
    with pytest.raises(UnavailableError) as caught:
        provider.unpin()
    assert caught.value.platform == "m"
    provider.unpin()  # not retried, not raised again


def test_pin_errors_are_attributed(fake: FakeModal, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = ModalProvider(platform(app="nowhere"), sdk=fake)
    monkeypatch.setenv("FAKE_MODAL_FAIL", "update_autoscaler")
    with pytest.raises(UnavailableError) as caught:
        provider.pin()
    assert caught.value.platform == "m"
    assert not provider.pinned


def test_unpin_after_the_ephemeral_app_stopped_does_nothing(
    fake: FakeModal, tmp_path: Path
) -> None:
    provider = ModalProvider(platform(ephemeral=True), sdk=fake)
    provider.start()
    provider.pin()
    provider.stop()
    provider.unpin()
    updates = [c["min_containers"] for c in calls(tmp_path) if c["call"] == "update_autoscaler"]
    assert updates == [1]
