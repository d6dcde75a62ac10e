"""A fake Modal adapter for tests: the methods of `ModalSDK`, no cloud.

Use it in-process (`ModalProvider(platform, sdk=FakeModal())`) or in pytest subprocesses
through the testing seam: `MODAL_VLLM_SDK_ADAPTER=fake_modal:FakeModal` (with `tests/` on
`PYTHONPATH`). It is driven by environment variables, read on every call, so that a test
can set them once for the processes it starts:

- `FAKE_MODAL_URLS`: JSON `{"app/function": "http://127.0.0.1:PORT", ...}`, the endpoints
  that exist ("app/server" for servers). A name not in it is not deployed: the same
  `NotDeployedError` as the real adapter.
- `FAKE_MODAL_DEPLOYED`: optional comma-separated app names that count as deployed at the
  start; unset means every app in `FAKE_MODAL_URLS` is. `deploy()` adds its app,
  `stop_app()` removes it (kept in the state file).
- `FAKE_MODAL_CALLS`: a file that gets one JSON line per call:
  `{"call": "locate", "app": ..., ...}`; the ephemeral run records `ephemeral_enter` and
  `ephemeral_exit` (with `"error"`: the exception type name, or null).
- `FAKE_MODAL_STATE`: a JSON file holding `min_containers` per "app/target" (and the deployed
  apps), so that pin and restore can be asserted across processes. A `null` value simulates
  a value that cannot be read (`UnavailableError`).
- `FAKE_MODAL_FAIL`: comma-separated method names that raise `UnavailableError`.
- `FAKE_MODAL_NO_AUTH=1`: every method raises the real adapter's missing-credentials error.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_modal_vllm.errors import UnavailableError
from pytest_modal_vllm.modal_sdk import (
    ModalStatus,
    ModalTarget,
    NotDeployedError,
    auth_error,
    not_deployed_error,
)


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


class FakeModal:
    """Records every call; answers from `FAKE_MODAL_*` variables and a JSON state file."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    # -- plumbing

    def _record(self, call: str, **fields: Any) -> None:
        entry = {"call": call, **fields}
        self.calls.append(entry)
        path = os.environ.get("FAKE_MODAL_CALLS")
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def _check(self, call: str) -> None:
        if os.environ.get("FAKE_MODAL_NO_AUTH") == "1":
            raise auth_error("Token missing. Could not authenticate client (fake)")
        if call in (_env_list("FAKE_MODAL_FAIL") or []):
            raise UnavailableError(f"fake Modal: {call} failed", "try again")

    @staticmethod
    def _urls() -> dict[str, str]:
        return dict(json.loads(os.environ.get("FAKE_MODAL_URLS", "{}")))

    @staticmethod
    def _state_path() -> Path | None:
        path = os.environ.get("FAKE_MODAL_STATE")
        return Path(path) if path else None

    def _state(self) -> dict[str, Any]:
        path = self._state_path()
        if path is None or not path.exists():
            return {}
        return dict(json.loads(path.read_text(encoding="utf-8") or "{}"))

    def _save(self, state: Mapping[str, Any]) -> None:
        path = self._state_path()
        if path is None:
            return
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(state, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # atomic: another process never reads half a file

    def _deployed(self) -> set[str]:
        state = self._state()
        if "deployed" in state:
            return set(state["deployed"])
        initial = _env_list("FAKE_MODAL_DEPLOYED")
        if initial is None:
            return {key.split("/", 1)[0] for key in self._urls()}
        return set(initial)

    def _set_deployed(self, apps: set[str]) -> None:
        state = self._state()
        state["deployed"] = sorted(apps)
        self._save(state)

    def _url(self, target: ModalTarget) -> str:
        url = self._urls().get(f"{target.app}/{target.name}")
        if url is None or target.app not in self._deployed():
            raise not_deployed_error(target, "fake Modal: no such deployed app")
        return url.rstrip("/")

    @staticmethod
    def _fields(target: ModalTarget) -> dict[str, Any]:
        return {
            "app": target.app,
            "function": target.function,
            "server": target.server,
            "environment": target.environment,
        }

    # -- the adapter

    def locate(self, target: ModalTarget) -> str:
        """The URL from `FAKE_MODAL_URLS`, if the app counts as deployed."""
        self._record("locate", **self._fields(target))
        self._check("locate")
        return self._url(target)

    def status(self, target: ModalTarget) -> ModalStatus:
        """Deployed or not, and the URL."""
        self._record("status", **self._fields(target))
        self._check("status")
        try:
            return ModalStatus(deployed=True, url=self._url(target))
        except NotDeployedError as error:
            return ModalStatus(deployed=False, url=None, detail=error.problem)

    def deploy(self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget) -> None:
        """Record the deploy and mark the app deployed."""
        self._record(
            "deploy",
            app_file=str(app_file),
            deploy_env=dict(deploy_env),
            app_name=target.app,
            environment=target.environment,
        )
        self._check("deploy")
        self._set_deployed(self._deployed() | {target.app})

    @contextlib.contextmanager
    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> Iterator[str]:
        """Yield the URL of `APP_NAME/target` from `FAKE_MODAL_URLS`; record enter and exit."""
        fields = {
            "app_file": str(app_file),
            "deploy_env": dict(deploy_env),
            "function": target.function,
            "server": target.server,
            "environment": target.environment,
        }
        self._record("ephemeral_enter", **fields)
        self._check("ephemeral")
        url = self._urls().get(f"{target.app}/{target.name}")
        if url is None:
            raise not_deployed_error(target, "fake Modal: no URL")
        error: BaseException | None = None
        try:
            yield url.rstrip("/")
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._record("ephemeral_exit", error=type(error).__name__ if error else None, **fields)

    def get_min_containers(self, target: ModalTarget) -> int:
        """The stored value (0 if none); a stored `null` cannot be read."""
        key = f"{target.app}/{target.name}"
        self._record("get_min_containers", **self._fields(target))
        self._check("get_min_containers")
        values = self._state().get("min_containers", {})
        if key in values and values[key] is None:
            raise UnavailableError(f"fake Modal: cannot read min_containers of {key}", "")
        return int(values.get(key, 0))

    def update_autoscaler(self, target: ModalTarget, min_containers: int) -> None:
        """Store the new value."""
        key = f"{target.app}/{target.name}"
        self._record("update_autoscaler", **self._fields(target), min_containers=min_containers)
        self._check("update_autoscaler")
        state = self._state()
        state.setdefault("min_containers", {})[key] = min_containers
        self._save(state)

    def stop_app(self, target: ModalTarget) -> bool:
        """Remove the app from the deployed ones; False if it was not deployed."""
        self._record("stop_app", app=target.app, environment=target.environment)
        self._check("stop_app")
        deployed = self._deployed()
        if target.app not in deployed:
            return False
        self._set_deployed(deployed - {target.app})
        return True


def read_calls(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The calls recorded in a `FAKE_MODAL_CALLS` file, in order."""
    file = Path(path)
    if not file.exists():
        return []
    return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `FAKE_MODAL_STATE` file as a dict ({} when absent)."""
    file = Path(path)
    return dict(json.loads(file.read_text(encoding="utf-8"))) if file.exists() else {}
