"""Modal's exceptions, translated into the plugin's errors (exit 4 or exit 75)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import ConfigError, DefinitionError, UnavailableError
from .values import ModalTarget, auth_error, not_deployed_error

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
def modal_errors(action: str, target: ModalTarget, *, lookup: bool = True) -> Iterator[None]:
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
