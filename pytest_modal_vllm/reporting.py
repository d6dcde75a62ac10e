"""What the plugin prints: the live wake progress, the header lines, the platform listing."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .endpoint import Endpoint
from .platforms import Platform
from .wake import WakeState

if TYPE_CHECKING:
    from .resolution import Setting

# Without a terminal (CI logs), a progress line is printed when the last answer changes, and
# at least this often while nothing changes.
PLAIN_PROGRESS_EVERY = 10.0


class WakeProgress:
    """Renders wake progress: one line rewritten in place on a terminal, plain lines otherwise."""

    def __init__(
        self,
        write_line: Callable[[str], None],
        rewrite: Callable[[str], None] | None,
    ) -> None:
        self.write_line = write_line
        self.rewrite = rewrite
        self._seen: dict[str, str] = {}
        self._last_plain = 0.0
        self._rewrote = False

    def __call__(self, states: list[WakeState]) -> None:
        """Show the current state of every wake."""
        if not states:
            return
        line = "vllm: waking " + " | ".join(state.line() for state in states)
        if self.rewrite is not None:
            self.rewrite(line)
            self._rewrote = True
            return
        changed = any(self._seen.get(s.platform) != s.last for s in states)
        now = time.monotonic()
        if changed or now - self._last_plain >= PLAIN_PROGRESS_EVERY:
            self.write_line(line)
            self._last_plain = now
            self._seen = {s.platform: s.last for s in states}

    def finish(self) -> None:
        """End the rewritten line so that later output starts on a fresh one."""
        if self._rewrote:
            self.write_line("")


def header_line(endpoint: Endpoint) -> str:
    """`vllm: NAME -> BASE_URL model=MODEL woke in 12.3s (cold)`."""
    state = "cold" if endpoint.cold else "warm"
    return (
        f"vllm: {endpoint.platform} -> {endpoint.base_url} model={endpoint.model} "
        f"woke in {endpoint.wake_seconds:.1f}s ({state})"
    )


def settings_line(name: str, values: Mapping[str, Setting[Any]]) -> str:
    """`vllm: NAME wake_timeout=900 (modal default), keep_alive=ping (command line)`."""
    parts = [f"{key}={_show(s.value)} ({s.source})" for key, s in values.items()]
    return f"vllm: {name} " + ", ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def platform_rows(platforms: Mapping[str, Platform]) -> list[dict[str, str]]:
    """One row per known platform: name, kind, source, model, target."""
    return [
        {
            "name": p.name,
            "kind": p.kind,
            "source": p.source,
            "model": _model_label(p.model),
            "target": p.target(),
        }
        for p in sorted(platforms.values(), key=lambda p: p.name)
    ]


def _model_label(model: str | None) -> str:
    """The model for listings: `${VLLM_MODEL:-}` reads as "VLLM_MODEL or first served"."""
    if not model:
        return "(first served)"
    if model.startswith("${") and model.endswith(":-}"):
        return f"({model[2:-3]} or first served)"
    return model


def platform_table(platforms: Mapping[str, Platform]) -> list[str]:
    """The platform listing as aligned lines."""
    rows = platform_rows(platforms)
    columns: Sequence[str] = ("name", "kind", "source", "model", "target")
    widths = {c: max([len(c)] + [len(row[c]) for row in rows]) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(row[c].ljust(widths[c]) for c in columns).rstrip() for row in rows]
    return lines
