"""Per-platform usage: counters, the xdist merge, and the three reports.

Counters are recorded by the clients' transport (`clients.py`) in whichever process runs the
test; xdist workers hand theirs to the controller through `workeroutput`, which merges them.
Reports: the terminal section `vllm usage`, the `--vllm-report` JSON, and the GitHub step
summary (Markdown appended to `$GITHUB_STEP_SUMMARY`).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PlatformUsage:
    """What the tests asked of one platform."""

    requests: int = 0
    errors: int = 0
    # Answered from a cassette (`--record-mode`), not by the endpoint.
    replayed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for `workeroutput`."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "replayed": self.replayed,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latencies_ms": list(self.latencies_ms),
        }


class UsageMeter:
    """Thread-safe usage counters by platform name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.platforms: dict[str, PlatformUsage] = {}

    def record(
        self,
        platform: str,
        *,
        latency_ms: float,
        error: bool,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        replayed: bool = False,
    ) -> None:
        """Count one request."""
        with self._lock:
            usage = self.platforms.setdefault(platform, PlatformUsage())
            usage.requests += 1
            usage.errors += int(error)
            usage.replayed += int(replayed)
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.latencies_ms.append(latency_ms)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """A copy of every counter as plain data."""
        with self._lock:
            return {name: usage.to_dict() for name, usage in self.platforms.items()}

    def merge(self, data: Mapping[str, Mapping[str, Any]]) -> None:
        """Add another process's `snapshot()` to these counters."""
        with self._lock:
            for name, other in data.items():
                usage = self.platforms.setdefault(name, PlatformUsage())
                usage.requests += int(other.get("requests", 0))
                usage.errors += int(other.get("errors", 0))
                usage.replayed += int(other.get("replayed", 0))
                usage.prompt_tokens += int(other.get("prompt_tokens", 0))
                usage.completion_tokens += int(other.get("completion_tokens", 0))
                usage.latencies_ms.extend(float(v) for v in other.get("latencies_ms", ()))


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank percentile `q` (0-100) of `values`, or None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def report_rows(
    platforms: Iterable[Mapping[str, Any]], meter: UsageMeter, pings: Mapping[str, int]
) -> list[dict[str, Any]]:
    """One report row per selected platform, in the `--vllm-report` JSON shape.

    `platforms` gives `name`, `base_url`, `model`, `wake_seconds`, `cold` and, for a platform
    that could not be woken, `error` (the paragraph).
    """
    usage = meter.snapshot()
    rows = []
    for info in platforms:
        name = str(info["name"])
        counts = usage.get(name, PlatformUsage().to_dict())
        latencies = counts["latencies_ms"]
        p50, p95, top = (
            percentile(latencies, 50),
            percentile(latencies, 95),
            max(latencies, default=None),
        )
        row: dict[str, Any] = {
            "name": name,
            "base_url": info.get("base_url"),
            "model": info.get("model"),
            "wake_seconds": None
            if info.get("wake_seconds") is None
            else round(float(info["wake_seconds"]), 3),
            "cold": info.get("cold"),
            "requests": counts["requests"],
            "errors": counts["errors"],
            "replayed": counts["replayed"],
            "prompt_tokens": counts["prompt_tokens"],
            "completion_tokens": counts["completion_tokens"],
            "latency_ms": {
                "p50": _round(p50),
                "p95": _round(p95),
                "max": _round(top),
            },
            "keep_alive_pings": int(pings.get(name, 0)),
        }
        if info.get("error"):
            row["error"] = info["error"]
        if info.get("replay"):
            row["replay"] = True  # answered from cassettes: no wake, no endpoint
        rows.append(row)
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def write_json(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write `{"platforms": rows}` to `path` (parents created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"platforms": rows}, indent=2) + "\n", encoding="utf-8")
    return target


_COLUMNS = (
    "platform",
    "requests",
    "errors",
    "replayed",
    "prompt tok",
    "compl tok",
    "p50 ms",
    "p95 ms",
    "max ms",
    "wake s",
    "pings",
)


def _cells(row: Mapping[str, Any]) -> list[str]:
    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.0f}" if isinstance(value, float) else str(value)

    wake = row.get("wake_seconds")
    wake_text = "-" if wake is None else f"{wake:.1f}" + (" cold" if row.get("cold") else "")
    if row.get("replay"):
        wake_text = "replay"
    latency = row["latency_ms"]
    return [
        str(row["name"]),
        fmt(row["requests"]),
        fmt(row["errors"]),
        fmt(row["replayed"]),
        fmt(row["prompt_tokens"]),
        fmt(row["completion_tokens"]),
        fmt(latency["p50"]),
        fmt(latency["p95"]),
        fmt(latency["max"]),
        "unavailable" if row.get("error") else wake_text,
        fmt(row["keep_alive_pings"]),
    ]


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The usage table as aligned plain-text lines (for the terminal summary)."""
    table = [list(_COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        )
        for line in table
    ]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The usage table as GitHub-flavoured Markdown, with a heading."""
    lines = [
        "### vllm usage",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
