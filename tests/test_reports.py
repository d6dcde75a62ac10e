"""Usage counters and what the plugin prints: merge, percentiles, the report row shape, the
terminal table, JSON and Markdown; the header and settings lines; the platform listing."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_modal_vllm.endpoint import Endpoint
from pytest_modal_vllm.platforms import builtin_platforms
from pytest_modal_vllm.reporting import (
    WakeProgress,
    header_line,
    platform_table,
    settings_line,
)
from pytest_modal_vllm.resolution import Setting
from pytest_modal_vllm.usage import (
    UsageMeter,
    markdown,
    percentile,
    report_rows,
    table_lines,
    write_json,
)
from pytest_modal_vllm.wake import WakeState


def meter_with(*latencies: float, errors: int = 0) -> UsageMeter:
    meter = UsageMeter()
    for index, latency in enumerate(latencies):
        meter.record(
            "p", latency_ms=latency, error=index < errors, prompt_tokens=3, completion_tokens=2
        )
    return meter


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


def test_merge_adds_another_process_counters() -> None:
    controller, worker = meter_with(10.0), meter_with(20.0, 30.0, errors=1)
    controller.merge(json.loads(json.dumps(worker.snapshot())))  # as it crosses from a worker
    usage = controller.snapshot()["p"]
    assert (usage["requests"], usage["errors"]) == (3, 1)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (9, 6)
    assert sorted(usage["latencies_ms"]) == [10.0, 20.0, 30.0]


def rows() -> list[dict[str, object]]:
    platforms = [
        {"name": "p", "base_url": "http://h/v1", "model": "m", "wake_seconds": 12.34, "cold": True},
        {"name": "gone", "error": "vllm platform 'gone': did not become ready."},
    ]
    return report_rows(platforms, meter_with(100.0, 200.0, 300.0, errors=1), {"p": 4})


def test_report_rows_have_the_documented_shape() -> None:
    ok, gone = rows()
    assert ok == {
        "name": "p",
        "base_url": "http://h/v1",
        "model": "m",
        "wake_seconds": 12.34,
        "cold": True,
        "requests": 3,
        "errors": 1,
        "replayed": 0,
        "prompt_tokens": 9,
        "completion_tokens": 6,
        "latency_ms": {"p50": 200.0, "p95": 300.0, "max": 300.0},
        "keep_alive_pings": 4,
    }
    assert gone["requests"] == 0 and gone["error"].startswith("vllm platform 'gone'")
    assert gone["latency_ms"] == {"p50": None, "p95": None, "max": None}


def test_json_report_round_trips(tmp_path: Path) -> None:
    written = write_json(tmp_path / "deep" / "report.json", rows())
    assert json.loads(written.read_text()) == {"platforms": rows()}


def test_terminal_table_and_markdown_text() -> None:
    lines = table_lines(rows())
    assert lines[0].split() == [
        "platform", "requests", "errors", "replayed", "prompt", "tok", "compl", "tok",
        "p50", "ms", "p95", "ms", "max", "ms", "wake", "s", "pings",
    ]  # fmt: skip
    assert lines[1].split() == [
        "p", "3", "1", "0", "9", "6", "200", "300", "300", "12.3", "cold", "4"
    ]  # fmt: skip
    assert lines[2].split()[0] == "gone" and "unavailable" in lines[2]
    assert len({len(line.rstrip()) for line in lines[:2]}) == 1  # aligned columns
    text = markdown(rows())
    assert text.startswith("### vllm usage\n\n| platform | requests |")
    assert "| p | 3 | 1 | 0 | 9 | 6 | 200 | 300 | 300 | 12.3 cold | 4 |" in text


def test_header_and_settings_lines() -> None:
    endpoint = Endpoint("modal-llama", "https://x.modal.run/v1", "m", wake_seconds=81.26, cold=True)
    assert header_line(endpoint) == (
        "vllm: modal-llama -> https://x.modal.run/v1 model=m woke in 81.3s (cold)"
    )
    line = settings_line(
        "p",
        {"wake_timeout": Setting(900.0, "modal default"), "keep_alive": Setting("ping", "ini")},
    )
    assert line == "vllm: p wake_timeout=900 (modal default), keep_alive=ping (ini)"


def test_platform_listing_is_aligned_and_names_every_builtin() -> None:
    lines = platform_table(builtin_platforms())
    assert lines[0].split() == ["NAME", "KIND", "SOURCE", "MODEL", "TARGET"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == sorted(builtin_platforms())
    env = next(line for line in lines if line.startswith("env "))
    assert "(VLLM_MODEL or first served)" in env


def test_progress_rewrites_on_a_terminal_and_prints_changes_otherwise() -> None:
    written: list[str] = []
    rewritten: list[str] = []
    state = WakeState("p", 900.0)
    on_tty = WakeProgress(written.append, rewritten.append)
    on_tty([state])
    on_tty([state])
    assert len(rewritten) == 2 and rewritten[0].startswith("vllm: waking p ")
    on_tty.finish()
    assert written == [""]  # ends the rewritten line

    plain: list[str] = []
    in_ci = WakeProgress(plain.append, None)
    in_ci([state])
    in_ci([state])  # nothing changed: not printed again
    state.last = "503 Service Unavailable"
    in_ci([state])
    assert len(plain) == 2 and plain[1].endswith("503 Service Unavailable")
