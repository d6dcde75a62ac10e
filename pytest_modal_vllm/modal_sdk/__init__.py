"""The one package of the plugin that talks to the Modal SDK.

Everything Modal is behind `ModalSDK`; `modal` itself is imported inside its methods, so that
importing this package (and the plugin) costs nothing when no Modal platform is selected.
Modal's exceptions never leave this package (`translate.py`): they become `ConfigError` (exit 4:
not deployed, no credentials, invalid settings) or `UnavailableError` (exit 75: the Modal API
failed).

Testing seam: `load_sdk()` returns the object named by the environment variable
`MODAL_VLLM_SDK_ADAPTER` (`"module:attr"`, a class or factory called without arguments)
instead of `ModalSDK()`. The plugin's tests point it at a fake adapter so that pytest runs in
subprocesses (pytester) exercise the whole Modal path without Modal's cloud. It is a seam for
tests, not a user setting.

Modal SDK calls used (modal 1.6):

- locate: `Function.from_name(app, name, environment_name=).get_web_url()`, or
  `Server.from_name(app, name, environment_name=).get_url()` for an `@app.server` class;
- deploy: `with modal.enable_output(): app.deploy(name=, environment_name=)`;
- ephemeral: `with app.run(environment_name=):` and the local handle's `get_web_url()`/`get_url()`;
- status (wakes nothing): `get_web_url()`/`get_url()`, `Function.get_current_stats()` (or a
  Server's registered containers), `info()` (proxy auth), `App.lookup(...).get_tags()`;
- autoscaler: `<handle>.autoscaler.settings()` and `<handle>.autoscaler.update(...)`;
- leases: `modal.Dict.from_name(name, environment_name=, create_if_missing=True)` with `put`
  (`skip_if_exists=True` as an atomic create), `get`, `pop`, `items`;
- stop: `App.lookup(app, environment_name=).stop()`.

With no credentials configured (no `~/.modal.toml`, no `MODAL_TOKEN_ID`/`MODAL_TOKEN_SECRET`)
every one of these fails at once with `modal.exception.AuthError`, before any network access.
"""

from __future__ import annotations

from .adapter import ModalBackend, ModalSDK, load_sdk
from .app_file import bundled_app_file, fingerprint, load_app_file
from .translate import modal_errors
from .values import (
    ADAPTER_ENV,
    DEFAULT_FUNCTION,
    FINGERPRINT_TAG,
    SETTINGS_ENV,
    Autoscaler,
    LeaseStore,
    ModalStatus,
    ModalTarget,
    NotDeployedError,
    auth_error,
    deploy_fix,
    lease_dict_name,
    not_deployed_error,
)

__all__ = [
    "ADAPTER_ENV",
    "DEFAULT_FUNCTION",
    "FINGERPRINT_TAG",
    "SETTINGS_ENV",
    "Autoscaler",
    "LeaseStore",
    "ModalBackend",
    "ModalSDK",
    "ModalStatus",
    "ModalTarget",
    "NotDeployedError",
    "auth_error",
    "bundled_app_file",
    "deploy_fix",
    "fingerprint",
    "lease_dict_name",
    "load_app_file",
    "load_sdk",
    "modal_errors",
    "not_deployed_error",
]
