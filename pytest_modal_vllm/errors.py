"""The two ways a platform can fail, each with its documented exit code.

Every message is one paragraph that names the platform, the problem and the fix. The pytest
plugin turns `ConfigError` into `pytest.UsageError` (exit 4) and `UnavailableError` into
`pytest.exit(..., returncode=75)`; the `modal-vllm` command exits with the same codes.
"""

from __future__ import annotations

EXIT_CONFIG = 4
EXIT_UNAVAILABLE = 75


class PlatformError(Exception):
    """A platform could not be used; `str(error)` is the paragraph shown to the user."""

    exit_code = 1

    def __init__(self, problem: str, fix: str = "", *, platform: str | None = None) -> None:
        self.platform = platform
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ")
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        """The whole message: `vllm platform 'NAME': problem. Fix: fix.`"""
        where = f"vllm platform {self.platform!r}: " if self.platform else "vllm: "
        text = f"{where}{self.problem}."
        if self.fix:
            text += f" Fix: {self.fix}."
        return text

    def for_platform(self, platform: str) -> PlatformError:
        """The same error, attributed to `platform` if it was not yet."""
        if self.platform:
            return self
        return type(self)(self.problem, self.fix, platform=platform)


class ConfigError(PlatformError):
    """Bad configuration, wrong key, wrong URL, model not served: exit 4."""

    exit_code = EXIT_CONFIG


class DefinitionError(ConfigError):
    """The platform's own definition is broken (its app does not build, Modal refuses it):
    exit 4 even with `--vllm-unavailable=skip`, which skips platforms this environment cannot
    reach, never a broken one."""


class UnavailableError(PlatformError):
    """The endpoint did not become ready in time or cannot be reached: exit 75."""

    exit_code = EXIT_UNAVAILABLE


class SettingUnreadable(UnavailableError):
    """A setting that was to be changed and later restored could not be read: it is not
    changed at all (a value that was not read is never written back as a guess)."""
