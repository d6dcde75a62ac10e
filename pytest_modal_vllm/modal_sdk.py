"""The one module of the plugin that talks to the Modal SDK.

Everything Modal is behind `ModalSDK`; `modal` itself is imported inside its methods, so that
importing this module (and the plugin) costs nothing when no Modal platform is selected.
Modal's exceptions never leave this module: they become `ConfigError` (exit 4: not deployed,
no credentials, invalid settings) or `UnavailableError` (exit 75: the Modal API failed).

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

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, cast

from .errors import ConfigError, DefinitionError, UnavailableError

if TYPE_CHECKING:
    import modal

ADAPTER_ENV = "MODAL_VLLM_SDK_ADAPTER"
DEFAULT_FUNCTION = "serve"
# The app tag that records the settings a deployed app was deployed with (`fingerprint()`).
FINGERPRINT_TAG = "modal-vllm-fingerprint"
# The settings handed to an app file as one JSON object: an app that reads them (the bundled
# one does) sees only the platform's settings, never unrelated variables of the shell.
SETTINGS_ENV = "MODAL_VLLM_SETTINGS"

AUTH_FIX = (
    "authenticate with Modal: run `modal setup` (or `modal token new`), or set "
    "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
)


class NotDeployedError(ConfigError):
    """The Modal app, or the function/server in it, is not deployed (exit 4)."""


@dataclass(frozen=True)
class ModalTarget:
    """The web function or server of a Modal app that a platform points at."""

    app: str
    # Exactly one of `function` and `server` is set (the function defaults to `serve`).
    function: str | None = DEFAULT_FUNCTION
    server: str | None = None
    environment: str | None = None

    @property
    def name(self) -> str:
        """The name looked up in the app: the server if set, else the function."""
        return self.server or self.function or DEFAULT_FUNCTION

    def describe(self) -> str:
        """`web function 'serve' of Modal app 'x'` (with the environment when set)."""
        kind = "server" if self.server else "web function"
        env = f" in Modal environment {self.environment!r}" if self.environment else ""
        return f"{kind} {self.name!r} of Modal app {self.app!r}{env}"


@dataclass(frozen=True)
class Autoscaler:
    """The autoscaler settings the plugin changes and restores."""

    min_containers: int
    # Seconds an idle container stays up; None when Modal reports none set.
    scaledown_window: int | None


class LeaseStore(Protocol):
    """A named, persistent key-value store shared by every session of an app (a `modal.Dict`
    on Modal): `put(..., skip_if_exists=True)` is an atomic create."""

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """Store `value`; with `skip_if_exists`, only if `key` is absent. True if stored."""
        ...

    def get(self, key: str) -> Any:
        """The value of `key`, or None."""
        ...

    def pop(self, key: str) -> Any:
        """Remove `key`; its value, or None."""
        ...

    def items(self) -> list[tuple[str, Any]]:
        """Every key and value."""
        ...


def lease_dict_name(target: ModalTarget) -> str:
    """`modal-vllm-leases-<app>`: the Dict of an app's leases (names stay under 64 characters:
    a long app name is cut and followed by a short hash of it)."""
    name = f"modal-vllm-leases-{target.app}"
    if len(name) > 63:
        name = f"{name[:54]}-{hashlib.sha256(target.app.encode()).hexdigest()[:8]}"
    return name


@dataclass(frozen=True)
class ModalStatus:
    """What `status()` found from Modal's control plane, without waking any container.

    `None` means "not known" (not deployed, or not offered for this kind of target).
    """

    deployed: bool
    url: str | None = None
    detail: str = ""
    # Containers running (booting or serving) and requests waiting for one.
    containers: int | None = None
    backlog: int | None = None
    # Whether the endpoint demands Modal proxy auth (False: anyone with the URL wakes it).
    proxy_auth: bool | None = None
    # The settings fingerprint the plugin tagged the deployed app with (see `deploy`).
    fingerprint: str | None = None


def deploy_fix(platform: str | None = None) -> str:
    """How to deploy: with the platform's name when known."""
    name = platform or "NAME"
    return (
        f"deploy it with `modal-vllm deploy {name}`, or run pytest with --vllm-deploy "
        "(or --vllm-ephemeral for an app that lives only as long as the session)"
    )


def not_deployed_error(
    target: ModalTarget, detail: str = "", *, platform: str | None = None
) -> NotDeployedError:
    """The error for a Modal app/function that cannot be found (the real and fake adapters)."""
    problem = f"the {target.describe()} is not deployed"
    if detail:
        problem += f" (Modal: {detail.strip().rstrip('.')})"
    return NotDeployedError(problem, deploy_fix(platform), platform=platform)


def auth_error(detail: str = "") -> ConfigError:
    """The error for missing or rejected Modal credentials."""
    problem = "no valid Modal credentials"
    # Modal's own message goes on to suggest `modal token new`: its first sentence is enough.
    first = detail.strip().split(". ", 1)[0].rstrip(".")
    if first:
        problem += f" (Modal: {first})"
    return ConfigError(problem, AUTH_FIX)


# Modal's exceptions that mean "try again": the API or the network failed for a moment. Every
# other `modal.exception.Error` is a problem of the app, its settings or the account (exit 4):
# with --vllm-unavailable=skip it must stop the run, not skip it.
_TRANSIENT = (
    "ConnectionError",
    "InternalError",
    "ServiceError",
    "ResourceExhaustedError",
    "TimeoutError",
    "InternalFailure",
)


@contextlib.contextmanager
def _modal_errors(action: str, target: ModalTarget, *, lookup: bool = True) -> Iterator[None]:
    """Turn Modal's exceptions raised while doing `action` into the plugin's two errors.

    Mapped by class, most specific first (`ImageBuildError` and `RemoteError` are `Error`s like
    the transient ones). `lookup` says whether a `NotFoundError` means "this app/function is
    not deployed"; during a deploy it means something else is missing (usually a Secret).
    """
    from modal import exception as mx

    try:
        yield
    except mx.AuthError as error:
        raise auth_error(str(error)) from error
    except mx.PermissionDeniedError as error:
        raise ConfigError(
            f"Modal denied the permission for {action} the {target.describe()} "
            f"(Modal: {_message(error)})",
            "use a token of the workspace that owns the app, with the role that allows it "
            "(deploying and changing autoscaler settings need a workspace member, not a "
            "read-only token); `modal token info` shows which one is in use",
        ) from error
    except mx.NotFoundError as error:
        if lookup:
            raise not_deployed_error(target, str(error)) from error
        raise ConfigError(
            f"{action} of Modal app {target.app!r} failed: {_message(error)}",
            _missing_object_fix(str(error)),
        ) from error
    except mx.ImageBuildError as error:
        raise DefinitionError(
            f"the image of Modal app {target.app!r} failed to build: {_message(error)}",
            "read the build output above (or `modal app logs " + target.app + "`), then fix the "
            "image settings in deploy_env (VLLM_VERSION, the base image) or the app file",
        ) from error
    except (mx.InvalidError, mx.VersionError) as error:
        raise DefinitionError(
            f"{action} of Modal app {target.app!r} was refused: {_message(error)}",
            "check the platform's app, function/server, environment and deploy_env",
        ) from error
    except mx.Error as error:
        problem = f"{action} of Modal app {target.app!r} failed: {type(error).__name__}: "
        problem += _message(error)
        if isinstance(error, tuple(getattr(mx, name) for name in _TRANSIENT if hasattr(mx, name))):
            raise UnavailableError(
                problem, "try again; if it persists, see https://status.modal.com"
            ) from error
        raise ConfigError(problem, "see Modal's message and the app's logs") from error


def _message(error: BaseException) -> str:
    return str(error).strip().rstrip(".")


def _missing_object_fix(message: str) -> str:
    if "secret" in message.lower():
        return (
            "create the Modal Secret the app needs; for the bundled app: `modal secret create "
            "vllm-api-key VLLM_API_KEY=<key>` (the same key as in your VLLM_API_KEY), or set "
            "ALLOW_UNAUTHENTICATED=1 in deploy_env to serve without a key"
        )
    return "create the missing Modal object, or fix its name in the app file or deploy_env"


# ----------------------------------------------------------------------- the app file


def bundled_app_file() -> Path:
    """The bundled `modal_app/vllm_server.py`.

    In an installed wheel it is `pytest_modal_vllm/_modal_app/vllm_server.py` (pyproject's
    force-include); in a source checkout, `<repo>/modal_app/vllm_server.py`.
    """
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "_modal_app" / "vllm_server.py"
    if installed.is_file():
        return installed
    return package_dir.parent / "modal_app" / "vllm_server.py"


def fingerprint(app_file: Path, deploy_env: Mapping[str, str]) -> str:
    """What a deploy of `app_file` with `deploy_env` deploys, as 32 hex digits.

    It covers the app file and its settings; for the bundled app also the modules beside it
    (the auth middleware), which ship with it. A custom app that imports other local files:
    redeploy with `--force` after changing only those.
    """
    digest = hashlib.sha256()
    files = [Path(app_file)]
    if Path(app_file).resolve() == bundled_app_file().resolve():
        files = sorted(Path(app_file).parent.glob("*.py"))
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    settings = {key: str(value) for key, value in deploy_env.items()}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


@dataclass
class LoadedApp:
    """A Modal app file imported with its deploy settings: the module and its `modal.App`."""

    path: Path
    module: ModuleType
    app: modal.App

    def handle(self, target: ModalTarget) -> Any:
        """The module attribute named by the target's server or function: the local handle."""
        import modal

        name = target.name
        handle = getattr(self.module, name, None)
        expected = modal.Server if target.server else modal.Function
        if not isinstance(handle, expected):
            what = "@app.server class" if target.server else "@modal.web_server function"
            raise ConfigError(
                f"the Modal app file {str(self.path)!r} defines no {what} named {name!r}",
                "set the platform's function/server to a name defined in that file",
            )
        return handle


def load_app_file(app_file: Path, deploy_env: Mapping[str, str]) -> LoadedApp:
    """Import `app_file` with `deploy_env` applied to `os.environ`, like `modal deploy FILE`.

    The same settings are also in `MODAL_VLLM_SETTINGS` (one JSON object): an app file that
    reads its settings from there (the bundled app does) sees only the platform's settings,
    never other variables of the shell or `.env`.

    Each call imports the file afresh (two platforms may share one file with different
    settings). The environment is restored as soon as the import is done: the app file reads
    its settings at import. During the import the module is registered in `sys.modules` under
    its file stem, the name Modal's containers import it by (Modal resolves each decorated
    function's module while decorating); the previous entry comes back afterwards.
    `os.environ` is process-wide: do not import app files from two threads at once.
    """
    import modal

    path = Path(app_file)
    if not path.is_file():
        raise ConfigError(
            f"the Modal app file {str(path)!r} does not exist",
            "fix the platform's modal_app path (relative paths start at the current directory)",
        )
    name = inspect.getmodulename(str(path))
    if not name or "." in name:
        raise ConfigError(
            f"{str(path)!r} is not a Python file Modal can import",
            "name the app file like vllm_server.py (no extra dots)",
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import the Modal app file {str(path)!r}", "")
    module = importlib.util.module_from_spec(spec)

    previous_module = sys.modules.get(name)
    applied = {key: str(value) for key, value in deploy_env.items()}
    applied[SETTINGS_ENV] = json.dumps(applied, sort_keys=True)
    saved_env = {key: os.environ.get(key) for key in applied}
    sys.modules[name] = module
    try:
        os.environ.update(applied)
        spec.loader.exec_module(module)
    except Exception as error:
        raise DefinitionError(
            f"the Modal app file {str(path)!r} failed to import with deploy_env "
            f"{sorted(deploy_env)}: {type(error).__name__}: {error}",
            "fix the deploy_env values of the platform (or the app file)",
        ) from error
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if previous_module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous_module

    apps = {attr: obj for attr, obj in vars(module).items() if isinstance(obj, modal.App)}
    if not apps:
        raise ConfigError(
            f"the Modal app file {str(path)!r} defines no modal.App",
            "define `app = modal.App(...)` at module level",
        )
    # Like `modal deploy`, prefer the attribute named `app` when there are several.
    app = apps.get("app") or next(iter(apps.values()))
    return LoadedApp(path=path, module=module, app=app)


# ----------------------------------------------------------------------- the adapter


class ModalBackend(Protocol):
    """What the modal provider and the CLI need from Modal; `ModalSDK` is the real one."""

    def locate(self, target: ModalTarget) -> str:
        """The URL of a deployed web function or server; `NotDeployedError` if there is none."""
        ...

    def deploy(
        self,
        app_file: Path,
        deploy_env: Mapping[str, str],
        target: ModalTarget,
        fingerprint: str,
    ) -> None:
        """Deploy the app defined in `app_file` under the target's app name, tagged with
        `fingerprint` (read back by `status`)."""
        ...

    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> AbstractContextManager[str]:
        """Run the app as an ephemeral Modal app while the context is open; yields the URL."""
        ...

    def autoscaler(self, target: ModalTarget) -> Autoscaler:
        """The current autoscaler settings; `UnavailableError` when they cannot be read."""
        ...

    def update_autoscaler(
        self,
        target: ModalTarget,
        *,
        min_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """Override the given settings (None: leave unchanged); a redeploy wipes overrides."""
        ...

    def leases(self, target: ModalTarget) -> LeaseStore:
        """The app's lease store (created on first use)."""
        ...

    def stop_app(self, target: ModalTarget) -> bool:
        """Stop a deployed app: True if it was stopped, False if it was not deployed."""
        ...

    def status(self, target: ModalTarget) -> ModalStatus:
        """Deployed or not, URL, containers, backlog, proxy auth, fingerprint; wakes nothing."""
        ...


class ModalSDK:
    """The real adapter: each method is one or two Modal SDK calls, errors translated."""

    def __init__(self) -> None:
        # Local handles of running ephemeral apps: such apps cannot be looked up by name, so
        # autoscaler calls use these instead.
        self._ephemeral_handles: dict[ModalTarget, Any] = {}

    # -- lookups

    def _remote_handle(self, target: ModalTarget) -> Any:
        local = self._ephemeral_handles.get(target)
        if local is not None:
            return local
        import modal

        # `from_name` is lazy: the first live method (get_web_url, autoscaler...) looks it up.
        if target.server:
            return modal.Server.from_name(
                target.app, target.server, environment_name=target.environment
            )
        return modal.Function.from_name(
            target.app, target.name, environment_name=target.environment
        )

    @staticmethod
    def _url_of(handle: Any, target: ModalTarget) -> str:
        import modal

        url = handle.get_url() if isinstance(handle, modal.Server) else handle.get_web_url()
        if not url:
            raise ConfigError(
                f"the {target.describe()} has no web URL",
                "point the platform at a @modal.web_server function (function = ...) or an "
                "@app.server class (server = ...)",
            )
        return str(url).rstrip("/")

    def locate(self, target: ModalTarget) -> str:
        """The URL of a deployed web function or server; `NotDeployedError` if there is none."""
        with _modal_errors("looking up", target):
            return self._url_of(self._remote_handle(target), target)

    def status(self, target: ModalTarget) -> ModalStatus:
        """Deployed or not, URL, containers, backlog, proxy auth, fingerprint.

        Control-plane calls only (`get_current_stats`, `info`, the app's tags): for a web
        endpoint any HTTP request is demand and would start a container; these do not.
        """
        import modal

        try:
            url = self.locate(target)
        except NotDeployedError as error:
            return ModalStatus(deployed=False, url=None, detail=error.problem)
        with _modal_errors("reading the state of", target):
            handle = self._remote_handle(target)
            if isinstance(handle, modal.Server):
                # A Server has no get_current_stats: its registered containers are the count.
                containers: int | None = len(handle._experimental_list_containers())
                backlog = None
                proxy_auth: bool | None = not handle.info().unauthenticated
            else:
                stats = handle.get_current_stats()
                containers, backlog = stats.num_total_runners, stats.backlog
                web = handle.info().web_info
                proxy_auth = None if web is None else not web.unauthenticated
            tags = {} if target in self._ephemeral_handles else self._app(target).get_tags()
        return ModalStatus(
            deployed=True,
            url=url,
            containers=containers,
            backlog=backlog,
            proxy_auth=proxy_auth,
            fingerprint=tags.get(FINGERPRINT_TAG),
        )

    @staticmethod
    def _app(target: ModalTarget) -> Any:
        import modal

        return modal.App.lookup(target.app, environment_name=target.environment)

    # -- deploy / ephemeral

    def deploy(
        self,
        app_file: Path,
        deploy_env: Mapping[str, str],
        target: ModalTarget,
        fingerprint: str,
    ) -> None:
        """Import `app_file` with `deploy_env`, `app.deploy(name=...)` with Modal's output
        shown, then tag the app with `fingerprint` (`status` reads it back)."""
        import modal

        loaded = load_app_file(app_file, deploy_env)
        with _modal_errors("deploying", target, lookup=False):
            with modal.enable_output():
                loaded.app.deploy(name=target.app, environment_name=target.environment)
            loaded.app.set_tags({**loaded.app.get_tags(), FINGERPRINT_TAG: fingerprint})

    @contextlib.contextmanager
    def ephemeral(
        self, app_file: Path, deploy_env: Mapping[str, str], target: ModalTarget
    ) -> Iterator[str]:
        """Run the app as an ephemeral Modal app while the context is open; yields the URL.

        The app stops when the context closes, also on an exception or Ctrl-C. Modal's output
        (the image build, then the container's logs) is shown while it runs.
        """
        import modal

        loaded = load_app_file(app_file, deploy_env)
        handle = loaded.handle(target)
        # Closed in `finally` with no exception handed in, whatever happened: Modal's run
        # context swallows a KeyboardInterrupt passed to its exit, and Ctrl-C must reach pytest.
        stack = contextlib.ExitStack()
        try:
            with _modal_errors("starting an ephemeral run", target, lookup=False):
                # Build logs, then the container's logs for as long as the run lasts.
                stack.enter_context(modal.enable_output())
                stack.enter_context(loaded.app.run(environment_name=target.environment))
                url = self._url_of(handle, target)
            self._ephemeral_handles[target] = handle
            yield url
        finally:
            self._ephemeral_handles.pop(target, None)
            with _modal_errors("stopping the ephemeral run", target, lookup=False):
                stack.close()

    # -- autoscaler

    def autoscaler(self, target: ModalTarget) -> Autoscaler:
        """`<handle>.autoscaler.settings()`: a control-plane call, it wakes nothing."""
        with _modal_errors("reading the autoscaler settings", target):
            settings = self._remote_handle(target).autoscaler.settings()
            window = settings.scaledown_window
            return Autoscaler(int(settings.min_containers or 0), int(window) if window else None)

    def update_autoscaler(
        self,
        target: ModalTarget,
        *,
        min_containers: int | None = None,
        scaledown_window: int | None = None,
    ) -> None:
        """`<handle>.autoscaler.update(...)` with only the given settings (an omitted one is
        unchanged; note that Modal reads an explicit `None` as 0)."""
        changes = {"min_containers": min_containers, "scaledown_window": scaledown_window}
        with _modal_errors("updating the autoscaler", target):
            self._remote_handle(target).autoscaler.update(
                **{key: value for key, value in changes.items() if value is not None}
            )

    def leases(self, target: ModalTarget) -> LeaseStore:
        """The app's `modal.Dict` (`lease_dict_name`), created if missing, in its environment."""
        return _ModalDict(target)

    # -- stop

    def stop_app(self, target: ModalTarget) -> bool:
        """Stop a deployed app: True if stopped, False if no such app is deployed."""
        from modal import exception as mx

        with _modal_errors("stopping", target, lookup=False):
            try:
                app = self._app(target)
            except mx.NotFoundError:
                return False
            app.stop()
            return True


class _ModalDict:
    """A `LeaseStore` on a named `modal.Dict` (values are pickled by Modal)."""

    def __init__(self, target: ModalTarget) -> None:
        self.target = target
        self._dict: Any = None

    def _handle(self) -> Any:
        import modal

        if self._dict is None:
            self._dict = modal.Dict.from_name(
                lease_dict_name(self.target),
                environment_name=self.target.environment,
                create_if_missing=True,
            )
        return self._dict

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        """`Dict.put` (atomic create with `skip_if_exists`)."""
        with _modal_errors("writing a lease of", self.target, lookup=False):
            return bool(self._handle().put(key, value, skip_if_exists=skip_if_exists))

    def get(self, key: str) -> Any:
        """`Dict.get`."""
        with _modal_errors("reading a lease of", self.target, lookup=False):
            return self._handle().get(key)

    def pop(self, key: str) -> Any:
        """`Dict.pop` (None when absent)."""
        with _modal_errors("removing a lease of", self.target, lookup=False):
            return self._handle().pop(key, None)

    def items(self) -> list[tuple[str, Any]]:
        """`Dict.items`."""
        with _modal_errors("reading the leases of", self.target, lookup=False):
            return list(self._handle().items())


# ----------------------------------------------------------------------- the seam


def load_sdk() -> ModalBackend:
    """The Modal adapter: `ModalSDK()`, or the test double named by `MODAL_VLLM_SDK_ADAPTER`.

    `MODAL_VLLM_SDK_ADAPTER="package.module:attr"` names a class or factory that is called
    without arguments. This is a testing seam: the plugin's tests use it to run whole pytest
    sessions (in subprocesses) against a fake Modal.
    """
    spec = os.environ.get(ADAPTER_ENV, "").strip()
    if not spec:
        return ModalSDK()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"{ADAPTER_ENV}={spec!r} is not of the form 'module:attr'",
            f"unset {ADAPTER_ENV} (it is a testing seam), or write it as package.module:Name",
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"{ADAPTER_ENV}={spec!r} cannot be loaded: {error}",
            f"unset {ADAPTER_ENV} (it is a testing seam), or make the module importable",
        ) from error
    return cast(ModalBackend, target() if callable(target) else target)
