"""Record once, replay anywhere: pytest-recording and vcrpy (the `record` extra), wired to LLM
platforms.

- `configure_vcr()` (called from pytest-recording's `pytest_recording_configure` hook) gives
  every cassette the defaults LLM traffic needs, which a user's own `vcr_config` overrides key
  by key: secrets filtered from what is written (`Authorization`, `Modal-Key`, `Modal-Secret`
  and every header a platform adds), matching on method, path and JSON body (not on host, so a
  cassette recorded on one platform replays on another), the plugin's own probes (wake, keep-
  alive, re-wake) never recorded.
- With `--record-mode` given, tests that use an LLM fixture get the `vcr` marker (`mark()`),
  so the one option is enough.
- While recording, the endpoint a module's tests talked to (base URL and model, per platform)
  is kept beside its cassettes in `cassettes/modal-vllm-endpoints.json` (`remember()`); with
  `--record-mode=none` nothing is started or woken and the fixtures get that endpoint back
  (`recorded_endpoints()`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .endpoint import SECRET_HEADERS, Endpoint
from .errors import ConfigError
from .probe import PROBE_HEADER

if TYPE_CHECKING:
    import pytest

ENDPOINTS_FILE = "modal-vllm-endpoints.json"
# Directories never searched for recordings.
_SKIPPED_DIRS = frozenset({".git", ".venv", "venv", "node_modules", "__pycache__", ".tox"})


def record_mode(config: pytest.Config) -> str | None:
    """`--record-mode` as given on the command line; None without it (or without the extra)."""
    try:
        mode = config.getoption("--record-mode")
    except ValueError:  # pytest-recording is not installed
        return None
    return str(mode) if mode else None


def replaying(config: pytest.Config) -> bool:
    """`--record-mode=none`: tests are answered from cassettes, no platform is started."""
    return record_mode(config) == "none"


def configure_vcr(vcr: Any, secret_headers: Iterable[str]) -> None:
    """The defaults of every cassette, set on the `VCR` object pytest-recording builds (the
    `vcr_config` fixture's keys, passed per cassette, win over these)."""
    names = sorted({*SECRET_HEADERS, *(name.lower() for name in secret_headers)})
    vcr.filter_headers = [(name, None) for name in names]
    # Not the host: a cassette recorded on one platform replays on another.
    vcr.register_matcher("json_body", json_body)
    vcr.match_on = ("method", "path", "json_body")
    vcr.decode_compressed_response = True
    user_hook = vcr.before_record_request

    def before_record_request(request: Any) -> Any:
        # The plugin's own probes (wake, keep-alive, re-wake) are not test traffic.
        if request.headers.get(PROBE_HEADER):
            return None
        return user_hook(request) if user_hook else request

    vcr.before_record_request = before_record_request


def json_body(sent: Any, recorded: Any) -> None:
    """vcrpy matcher: equal bodies, compared as JSON when both are; the `AssertionError`
    names the first difference, and vcrpy shows it when no recording matches."""
    first, second = _parsed(sent.body), _parsed(recorded.body)
    if first != second:
        where, this, that = _difference(first, second, "body")
        raise AssertionError(f"{where} is {this!r} here, {that!r} in the recording")


def _parsed(body: bytes | str | None) -> Any:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _difference(one: Any, other: Any, where: str) -> tuple[str, Any, Any]:
    """The first place where two JSON values differ, and both values there."""
    if isinstance(one, dict) and isinstance(other, dict):
        for key in sorted(set(one) | set(other), key=str):
            if one.get(key) != other.get(key):
                return _difference(one.get(key), other.get(key), f"{where}.{key}")
    if isinstance(one, list) and isinstance(other, list) and len(one) == len(other):
        for index, (a, b) in enumerate(zip(one, other, strict=True)):
            if a != b:
                return _difference(a, b, f"{where}[{index}]")
    return where, one, other


def mark(items: Iterable[pytest.Item], fixtures: frozenset[str]) -> None:
    """Give the `vcr` marker to every test that uses an LLM fixture and has none."""
    import pytest

    for item in items:
        if set(getattr(item, "fixturenames", ())) & fixtures and not item.get_closest_marker("vcr"):
            item.add_marker(pytest.mark.vcr)


def remember(cassette_dir: str, endpoint: Endpoint) -> None:
    """Keep `endpoint` (base URL, model) beside a module's cassettes, for replays."""
    path = Path(cassette_dir).parent / ENDPOINTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path) as recorded:
        recorded[endpoint.platform] = {"base_url": endpoint.base_url, "model": endpoint.model}


def recorded_endpoints(paths: Iterable[Path], platforms: Iterable[str]) -> dict[str, Endpoint]:
    """The recorded endpoint of each platform, from the recordings under `paths`, or a
    `ConfigError` naming the platform that has none."""
    found: dict[str, Mapping[str, Any]] = {}
    for path in _recordings(paths):
        for name, endpoint in json.loads(path.read_text(encoding="utf-8")).items():
            found.setdefault(name, endpoint)
    endpoints = {}
    for name in platforms:
        if name not in found:
            raise ConfigError(
                f"--record-mode=none replays cassettes, but none was recorded on this platform "
                f"(no {ENDPOINTS_FILE} beside the cassettes names it)",
                f"record them once: pytest --vllm-platform={name} --record-mode=once",
                platform=name,
            )
        endpoints[name] = Endpoint(name, found[name]["base_url"], found[name]["model"])
    return endpoints


def _recordings(paths: Iterable[Path]) -> Iterator[Path]:
    """Every endpoints file in a `cassettes` directory under `paths` (sorted, no duplicates)."""
    seen: set[Path] = set()
    for root in paths:
        start = root if root.is_dir() else root.parent
        for top, subdirs, files in os.walk(start):
            directory = Path(top)
            if directory.name == "cassettes" and ENDPOINTS_FILE in files:
                path = (directory / ENDPOINTS_FILE).resolve()
                if path not in seen:
                    seen.add(path)
                    yield path
            subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON object in `path`, changed in place under a lock (xdist workers record too)."""
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            data = json.loads(handle.read() or "{}")
            yield data
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
