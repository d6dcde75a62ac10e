"""A fake Modal adapter for tests: the methods of `ModalSDK`, no cloud.

Modal's side is played by the emulator (`modal_emulator.ModalEmulator`): this adapter answers
what Modal's control plane would (containers, backlog, proxy auth, autoscaler settings,
redeploys) by asking the emulator's `/__modal/` control API, which, like Modal's control plane,
never wakes a container. What Modal keeps apart from containers (which apps are deployed,
their tags) lives in a JSON state file. Use it in-process (`ModalProvider(platform,
sdk=FakeModal())`) or in pytest subprocesses through the testing seam:
`MODAL_VLLM_SDK_ADAPTER=fake_modal:FakeModal` (with `tests/` on `PYTHONPATH`). It is driven by
environment variables, read on every call, so that a test can set them once for the processes
it starts:

- `FAKE_MODAL_URLS`: JSON `{"app/function": "http://127.0.0.1:PORT", ...}`: the emulators
  that serve each target ("app/server" for servers). A name not in it is not deployed.
- `FAKE_MODAL_DEPLOYED`: optional comma-separated app names deployed at the start; unset
  means every app in `FAKE_MODAL_URLS` is. `deploy()` adds its app (and drains the app's
  emulator, as a rolling redeploy does), `stop_app()` removes it.
- `FAKE_MODAL_CALLS`: a file that gets one JSON line per call: `{"call": "locate", ...}`;
  the ephemeral run records `ephemeral_enter` and `ephemeral_exit` (with `"error"`).
- `FAKE_MODAL_STATE`: the JSON state file (deployed apps, tags); the lease Dicts live beside
  it in `<state>.dicts.json` (`FileDict`), shared by every process.
- `FAKE_MODAL_FAIL`: comma-separated method names that raise `UnavailableError`.
- `FAKE_MODAL_RAISE`: `method:ExceptionName` (e.g. `deploy:ImageBuildError`): that method
  raises that `modal.exception` class, through the real adapter's error mapping.
- `FAKE_MODAL_NO_AUTH=1`: every method raises the real adapter's missing-credentials error.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from pytest_modal_vllm.errors import UnavailableError
from pytest_modal_vllm.modal_sdk import (
    Autoscaler,
    ModalStatus,
    ModalTarget,
    NotDeployedError,
    auth_error,
    lease_dict_name,
    not_deployed_error,
)


def _env_list(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [item.strip() for item in raw.split(",") if item.strip()]


class FakeModal:
    """Records every call; answers from `FAKE_MODAL_*` variables, the emulators' control
    API and a JSON state file."""

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
        method, _, name = os.environ.get("FAKE_MODAL_RAISE", "").partition(":")
        if method == call:
            from modal import exception as mx

            from pytest_modal_vllm.modal_sdk import modal_errors

            error = getattr(mx, name)
            args = (f"fake Modal: {name}", "im-fake") if name == "ImageBuildError" else ()
            with modal_errors(call, ModalTarget("my-app"), lookup=False):
                raise error(*args) if args else error(f"fake Modal: {name}")

    @staticmethod
    def _urls() -> dict[str, str]:
        return dict(json.loads(os.environ.get("FAKE_MODAL_URLS", "{}")))

    def _state(self) -> dict[str, Any]:
        path = os.environ.get("FAKE_MODAL_STATE")
        if not path or not Path(path).exists():
            return {}
        return dict(json.loads(Path(path).read_text(encoding="utf-8") or "{}"))

    def _save(self, state: Mapping[str, Any]) -> None:
        path = os.environ.get("FAKE_MODAL_STATE")
        if not path:
            return
        tmp = Path(path + ".tmp")
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

    def _emulator(self, target: ModalTarget) -> str | None:
        url = self._urls().get(f"{target.app}/{target.name}")
        return url.rstrip("/") if url else None

    def _url(self, target: ModalTarget) -> str:
        url = self._emulator(target)
        if url is None or target.app not in self._deployed():
            raise not_deployed_error(target, "fake Modal: no such deployed app")
        return url

    def _control(self, target: ModalTarget, method: str, path: str, body: Any = None) -> Any:
        """A call to the emulator's control plane (`/__modal/PATH`); it wakes nothing."""
        answer = httpx.request(
            method, f"{self._url(target)}/__modal/{path}", json=body, timeout=10.0
        )
        if answer.status_code != 200:
            raise UnavailableError(f"fake Modal: {path} answered {answer.status_code}", "")
        return answer.json()

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
        """Deployed or not, URL, and the control plane's view; wakes nothing."""
        self._record("status", **self._fields(target))
        self._check("status")
        try:
            url = self._url(target)
        except NotDeployedError as error:
            return ModalStatus(deployed=False, url=None, detail=error.problem)
        stats = self._control(target, "GET", "stats")
        return ModalStatus(
            deployed=True,
            url=url,
            containers=stats["num_total_runners"],
            backlog=stats["backlog"],
            proxy_auth=stats["requires_proxy_auth"],
            fingerprint=self._state().get("tags", {}).get(target.app),
        )

    def deploy(
        self,
        app_file: Path,
        deploy_env: Mapping[str, str],
        target: ModalTarget,
        fingerprint: str,
    ) -> None:
        """Record the deploy, mark the app deployed and tagged; drain its emulator."""
        self._record(
            "deploy",
            app_file=str(app_file),
            deploy_env=dict(deploy_env),
            app_name=target.app,
            environment=target.environment,
        )
        self._check("deploy")
        self._set_deployed(self._deployed() | {target.app})
        state = self._state()
        state.setdefault("tags", {})[target.app] = fingerprint
        self._save(state)
        if self._emulator(target) is not None:
            self._control(target, "POST", "redeploy")

    @contextlib.contextmanager
    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> Iterator[str]:
        """Yield the URL of `APP_NAME/target` from `FAKE_MODAL_URLS`; record enter and exit.

        Prints a line as Modal's output would (the plugin must let it reach the terminal).
        """
        fields = {
            "app_file": str(app_file),
            "deploy_env": dict(deploy_env),
            "function": target.function,
            "server": target.server,
            "environment": target.environment,
        }
        self._record("ephemeral_enter", **fields)
        self._check("ephemeral")
        print(f"fake Modal: building the image of {target.app} (ephemeral run)", flush=True)
        url = self._emulator(target)
        if url is None:
            raise not_deployed_error(target, "fake Modal: no URL")
        error: BaseException | None = None
        try:
            yield url
        except BaseException as raised:
            error = raised
            raise
        finally:
            self._record("ephemeral_exit", error=type(error).__name__ if error else None, **fields)

    def autoscaler(self, target: ModalTarget) -> Autoscaler:
        """The emulator's effective settings; `UnavailableError` when unreadable."""
        self._record("autoscaler", **self._fields(target))
        self._check("autoscaler")
        settings = self._control(target, "GET", "autoscaler")
        window = settings["scaledown_window"]
        return Autoscaler(int(settings["min_containers"]), int(window) if window else None)

    def update_autoscaler(
        self,
        target: ModalTarget,
        *,
        min_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """Override the emulator's settings (None: unchanged)."""
        changes = {"min_containers": min_containers, "scaledown_window": scaledown_window}
        self._record("update_autoscaler", **self._fields(target), **changes)
        self._check("update_autoscaler")
        given = {key: value for key, value in changes.items() if value is not None}
        self._control(target, "POST", "autoscaler", given)

    def leases(self, target: ModalTarget) -> FileDict:
        """The app's lease store: a file shared by every process of the test, with a lock."""
        self._check("leases")
        state = os.environ.get("FAKE_MODAL_STATE") or str(Path.cwd() / "fake-modal-state.json")
        return FileDict(Path(state + ".dicts.json"), lease_dict_name(target), self._check)

    def stop_app(self, target: ModalTarget) -> bool:
        """Remove the app from the deployed ones; False if it was not deployed."""
        self._record("stop_app", app=target.app, environment=target.environment)
        self._check("stop_app")
        deployed = self._deployed()
        if target.app not in deployed:
            return False
        self._set_deployed(deployed - {target.app})
        return True


class FileDict:
    """A `modal.Dict` stand-in shared between processes: one JSON file of named dicts, every
    operation under an exclusive lock (`put(..., skip_if_exists=True)` is an atomic create).
    `FAKE_MODAL_FAIL=leases` makes every operation fail, as an unreachable Dict would."""

    def __init__(self, path: Path, name: str, check: Callable[[str], None]) -> None:
        self.path, self.name, self._check = path, name, check

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self._check("leases")
        with open(str(self.path) + ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                text = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
                data = json.loads(text or "{}")
                before = json.dumps(data, sort_keys=True)
                yield data.setdefault(self.name, {})
                if json.dumps(data, sort_keys=True) != before:
                    tmp = Path(str(self.path) + ".tmp")
                    tmp.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
                    tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Store `value`; with `skip_if_exists`, only if `key` is absent."""
        with self._locked() as entries:
            if skip_if_exists and key in entries:
                return False
            entries[key] = value
            return True

    def get(self, key: str) -> Any:
        """The value of `key`, or None."""
        with self._locked() as entries:
            return entries.get(key)

    def pop(self, key: str) -> Any:
        """Remove `key`; its value, or None."""
        with self._locked() as entries:
            return entries.pop(key, None)

    def items(self) -> list[tuple[str, Any]]:
        """Every key and value."""
        with self._locked() as entries:
            return list(entries.items())


def read_dict(state_path: str | os.PathLike[str], app: str) -> dict[str, Any]:
    """The lease Dict of `app` as a dict (for assertions)."""
    file = Path(str(state_path) + ".dicts.json")
    data = json.loads(file.read_text(encoding="utf-8")) if file.exists() else {}
    return dict(data.get(lease_dict_name(ModalTarget(app)), {}))


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
