"""The plugin's per-run state, kept in `config.stash`, and the decisions made from it.

The controller fills it in `pytest_sessionstart` (after the wake); xdist workers fill it from
`workerinput`. Hooks and fixtures only ask it questions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .platforms import Platform, load_platforms
from .settings import Settings
from .usage import UsageMeter

if TYPE_CHECKING:
    import pytest

    from .clients import ClientFactory
    from .session import EndpointSession, ReadyPlatform

LLM_FIXTURES = frozenset(
    {
        "vllm_platform",
        "vllm_endpoint",
        "openai_client",
        "async_openai_client",
        "chat_model",
        "chat_model_factory",
    }
)
# The fixtures that talk to an endpoint (all but the platform name).
CLIENT_FIXTURES = LLM_FIXTURES - {"vllm_platform"}
WORKERINPUT_KEY = "modal_vllm"
WORKEROUTPUT_KEY = "modal_vllm_usage"


def parametrized_platform(item: pytest.Item | None) -> str | None:
    """The platform `item` is parametrized with (`test_x[NAME]`, as the `vllm_platform`
    fixture returns it), or None when it is not parametrized with one."""
    callspec = getattr(item, "callspec", None)
    params: Mapping[str, Any] = callspec.params if callspec is not None else {}
    return str(params["vllm_platform"]) if "vllm_platform" in params else None


@dataclass
class Runtime:
    """Everything the hooks and fixtures of one pytest run share."""

    settings: Settings
    ready: dict[str, ReadyPlatform] = field(default_factory=dict)
    # Platforms that could not be woken under --vllm-unavailable=skip: name -> paragraph.
    unavailable: dict[str, str] = field(default_factory=dict)
    meter: UsageMeter = field(default_factory=UsageMeter)
    session: EndpointSession | None = None
    factories: dict[str, ClientFactory] = field(default_factory=dict)
    # `--record-mode=none`: the ready platforms are the recorded endpoints, nothing started.
    replay: bool = False
    # (cassette directory, platform) pairs whose endpoint this process has recorded.
    remembered: set[tuple[str, str]] = field(default_factory=set)
    _capabilities: dict[str, tuple[str, ...]] | None = None
    _known: dict[str, Platform] | None = None

    @property
    def selected(self) -> list[str]:
        """The selected platform names, in order."""
        return self.settings.platforms

    def known(self) -> dict[str, Platform]:
        """Every known platform (read lazily: only when a name or capability is needed)."""
        if self._known is None:
            self._known = load_platforms(self.settings.rootdir, self.settings["config"])
        return self._known

    def known_names(self) -> list[str]:
        """Known platform names for messages; never fails (a broken file lists built-ins)."""
        from .errors import PlatformError

        try:
            return sorted(self.known())
        except PlatformError:
            from .platforms import builtin_platforms

            return sorted(builtin_platforms())

    @property
    def capabilities(self) -> dict[str, tuple[str, ...]]:
        """The capabilities of each selected platform (from its definition)."""
        if self._capabilities is None:
            known = self.known()
            self._capabilities = {
                name: known[name].capabilities for name in self.selected if name in known
            }
        return self._capabilities

    def platforms_of(self, item: pytest.Item) -> list[str]:
        """The platforms `item` runs on: its parametrized `[NAME]`, else every selected one."""
        name = parametrized_platform(item)
        return [name] if name is not None else self.selected

    def no_platform_reason(self) -> str:
        """The documented skip reason when no platform is selected."""
        return (
            f"no LLM platform selected: pass --vllm-platform=NAME "
            f"(known: {', '.join(self.known_names())})"
        )

    def factory(self, name: str) -> ClientFactory:
        """The client factory of a woken platform (one per platform and process)."""
        from .clients import ClientFactory

        if name not in self.factories:
            ready = self.ready[name]
            self.factories[name] = ClientFactory(
                ready.endpoint, ready.client, self.meter, ready.wake.rewake
            )
        return self.factories[name]

    # ------------------------------------------------------------------ skipping

    def skip_reason(self, item: pytest.Item) -> str | None:
        """Why `item` must be skipped on this run, or None to run it."""
        fixtures = set(getattr(item, "fixturenames", ()))
        # Stacked markers combine (module `pytestmark` and decorators): every `vllm_requires`
        # adds capabilities, every `vllm_platforms` narrows the platforms.
        only: set[str] | None = None
        for marker in item.iter_markers("vllm_platforms"):
            only = set(marker.args) if only is None else only & set(marker.args)
        requires = {
            str(arg) for marker in item.iter_markers("vllm_requires") for arg in marker.args
        }
        if not (fixtures & LLM_FIXTURES or only is not None or requires):
            return None
        if not self.selected:
            return self.no_platform_reason()
        reasons = [self._reason_for(name, only, requires) for name in self.platforms_of(item)]
        if all(reasons):
            return reasons[0]
        return None

    def _reason_for(self, name: str, only: set[str] | None, requires: set[str]) -> str | None:
        if only is not None and name not in only:
            return f"runs only on {', '.join(sorted(only)) or 'no platform'} (this run: {name})"
        if requires:
            have = self.capabilities.get(name, ())
            missing = sorted(cap for cap in requires if cap not in have)
            if missing:
                return (
                    f"platform {name!r} lacks capability {', '.join(missing)} "
                    f"(it has: {', '.join(have) or 'none'})"
                )
        if name in self.unavailable:
            return self.unavailable[name]
        return None

    # ------------------------------------------------------------------ xdist

    def to_workerinput(self) -> dict[str, Any]:
        """What a worker needs: woken platforms, unavailable ones, capabilities."""
        return {
            "ready": {name: ready.to_dict() for name, ready in self.ready.items()},
            "unavailable": dict(self.unavailable),
            "capabilities": {name: list(caps) for name, caps in self.capabilities.items()},
            "replay": self.replay,
        }

    def load_workerinput(self, data: Mapping[str, Any]) -> None:
        """Take the controller's platforms (workers never start or wake anything)."""
        from .session import ReadyPlatform

        self.ready = {name: ReadyPlatform.from_dict(d) for name, d in data["ready"].items()}
        self.unavailable = dict(data["unavailable"])
        self._capabilities = {name: tuple(caps) for name, caps in data["capabilities"].items()}
        self.replay = bool(data["replay"])

    # ------------------------------------------------------------------ reports

    def report_platforms(self) -> list[dict[str, Any]]:
        """Per selected platform: what the report rows show about its endpoint."""
        rows = []
        for name in self.selected:
            ready = self.ready.get(name)
            if ready is not None:
                endpoint = ready.endpoint
                rows.append(
                    {
                        "name": name,
                        "base_url": endpoint.base_url,
                        "model": endpoint.model,
                        "wake_seconds": None if self.replay else endpoint.wake_seconds,
                        "cold": None if self.replay else endpoint.cold,
                        "replay": self.replay,
                    }
                )
            else:
                rows.append({"name": name, "error": self.unavailable.get(name, "not started")})
        return rows

    def keep_alive_pings(self) -> dict[str, int]:
        """Keep-alive pings so far (the controller runs keep-alive)."""
        return self.session.keep_alive_pings() if self.session is not None else {}
