"""`modal-vllm deploy/status/stop/wake` on a modal platform, through the fake Modal adapter and
the Modal emulator (`ModalEmulator`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import platforms_toml, run_cli

TESTS = Path(__file__).resolve().parent


def test_deploy_status_wake_stop(tmp_path, endpoint_server):
    server = endpoint_server(cold_start=2.0, cold_style="hold", scaledown_window=30)
    server.scale_to_zero()  # asleep until the wake
    (tmp_path / "pyproject.toml").write_text(
        platforms_toml(
            {
                "mine": {
                    "kind": "modal",
                    "app": "my-app",
                    "keep_alive": "off",
                    "deploy_env": {"MODEL_NAME": "Org/M"},
                }
            },
            "tool.modal-vllm.platforms",
        )
    )
    calls = tmp_path / "calls.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "MODAL_VLLM_SDK_ADAPTER": "fake_modal:FakeModal",
        "FAKE_MODAL_URLS": json.dumps({"my-app/serve": server.root_url}),
        "FAKE_MODAL_DEPLOYED": "",
        "FAKE_MODAL_CALLS": str(calls),
        "FAKE_MODAL_STATE": str(tmp_path / "state.json"),
    }

    status = run_cli(tmp_path, "status", "mine", env=env)
    assert status.returncode == 0, status.stderr
    assert "deployed: no" in status.stdout and "modal-vllm deploy mine" in status.stdout
    assert server.stats.requests == {}  # status wakes nothing

    deploy = run_cli(tmp_path, "deploy", "mine", env=env)
    assert deploy.returncode == 0, deploy.stderr
    assert "deployed app 'my-app'" in deploy.stdout
    again = run_cli(tmp_path, "deploy", "mine", env=env)
    assert "already deployed with these settings: not redeployed" in again.stdout
    assert "--force" in again.stdout

    # Deployed and cold: status reads Modal's control plane only, and causes no cold start.
    boots = server.stats.cold_starts
    status = run_cli(tmp_path, "status", "mine", env=env)
    assert status.returncode == 0, status.stderr
    assert "containers: 0 running, 0 queued" in status.stdout
    assert "answers /health now: not asked" in status.stdout
    assert "WARNING: proxy auth is off" in status.stdout
    assert "deployed with: the platform's settings" in status.stdout
    assert server.stats.cold_starts == boots
    assert server.stats.requests == {}

    wake = run_cli(tmp_path, "wake", "mine", "--timeout", "20", env=env)
    assert wake.returncode == 0, wake.stderr
    assert f"mine -> {server.base_url} model=stub woke in" in wake.stdout
    assert "(cold)" in wake.stdout
    assert "no container running: a cold start is expected" in wake.stderr

    status = run_cli(tmp_path, "status", "mine", env=env)
    assert "deployed: yes" in status.stdout
    assert f"url: {server.base_url}" in status.stdout
    assert "containers: 1 running" in status.stdout
    assert "answers /health now: yes" in status.stdout

    forced = run_cli(tmp_path, "deploy", "mine", "--force", env=env)
    assert "deployed app 'my-app'" in forced.stdout

    stop = run_cli(tmp_path, "stop", "mine", env=env)
    assert stop.returncode == 0 and "stopped app 'my-app'" in stop.stdout
    again = run_cli(tmp_path, "stop", "mine", env=env)
    assert "not deployed, nothing to stop" in again.stdout

    entries = [json.loads(line) for line in calls.read_text().splitlines()]
    recorded = [entry["call"] for entry in entries]
    assert recorded.count("deploy") == 2  # the first and the forced one
    deploy_call = entries[recorded.index("deploy")]
    assert deploy_call["app_name"] == "my-app"
    assert deploy_call["deploy_env"]["MODEL_NAME"] == "Org/M"
    assert recorded.count("stop_app") == 2


def test_wake_without_credentials_exits_4(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        platforms_toml({"mine": {"kind": "modal", "app": "my-app"}}, "tool.modal-vllm.platforms")
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS),
        "MODAL_VLLM_SDK_ADAPTER": "fake_modal:FakeModal",
        "FAKE_MODAL_NO_AUTH": "1",
        "FAKE_MODAL_URLS": "{}",
    }
    wake = run_cli(tmp_path, "wake", "mine", env=env)
    assert wake.returncode == 4
    assert "modal setup" in wake.stderr and "Traceback" not in wake.stderr
