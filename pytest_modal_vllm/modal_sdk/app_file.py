"""The app file: the bundled one, what a deploy of it is (fingerprint), and loading it."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DefinitionError
from .values import SETTINGS_ENV, ModalTarget

if TYPE_CHECKING:
    import modal


def bundled_app_file() -> Path:
    """The bundled `modal_app/vllm_server.py`.

    In an installed wheel it is `pytest_modal_vllm/_modal_app/vllm_server.py` (pyproject's
    force-include); in a source checkout, `<repo>/modal_app/vllm_server.py`.
    """
    package_dir = Path(__file__).resolve().parent.parent
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
