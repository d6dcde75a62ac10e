"""Run every benchmark and write docs/benchmarks.md (one command reproduces the whole table).

.venv/bin/python benchmarks/run_all.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import client_overhead
import cold_start_budget
import concurrent_wake
import gpu_cost
import idle_overhead
import langchain_standard
import record_replay
import shared_app
import vllm_cpu
import wake_lag

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    idle = idle_overhead.main()
    lags = wake_lag.main()
    rows = [
        (
            "Idle overhead: `pytest --collect-only` on 300 tests, no platform selected",
            f"median of {idle_overhead.ROUNDS} alternating runs each",
            f"{idle['collect_with_plugin_s']:.3f} s vs {idle['collect_without_plugin_s']:.3f} s",
            f"ratio **{idle['ratio']:.3f}** vs `-p no:modal_vllm` (goal <= 1.05)",
        ),
        (
            "Import of `pytest_modal_vllm.plugin`",
            "median, fresh interpreter with pytest loaded",
            f"{idle['plugin_import_ms']:.1f} ms",
            "-",
        ),
    ]
    for style, row in lags.items():
        polls = ", ".join(f"{k}: {v:.3f} s" for k, v in row.items() if k.startswith("poll"))
        best = min(v for k, v in row.items() if k.startswith("poll"))
        rows.append(
            (
                f"Wake-detection lag, {style}-style server",
                f"median over {wake_lag.ROUNDS} cold starts of 1-2 s (random phase)",
                f"plugin {row['plugin']:.3f} s; ready -> first test "
                f"{row['plugin ready->first test']:.3f} s",
                f"{polls} (best fixed interval {best:.3f} s)",
            )
        )
    together = concurrent_wake.main()
    rows.append(
        (
            "Concurrent wake of 3 platforms (cold starts 1, 2, 3 s; refuse, 503, hold)",
            "`wake_all`, one run",
            f"{together['total_s']:.2f} s total",
            f"ratio to the slowest **{together['ratio_to_slowest']:.2f}** "
            f"(sequential would be {together['sum_of_cold_starts_s']:.0f} s)",
        )
    )
    clients = client_overhead.main()
    for kind in ("sync", "streaming"):
        rows.append(
            (
                f"Client overhead, {kind}",
                f"{client_overhead.REQUESTS} requests each against the stub (separate "
                "process), alternating blocks, median per request",
                f"{clients[kind + '_metered_ms']:.2f} ms metered vs "
                f"{clients[kind + '_plain_ms']:.2f} ms plain `openai.OpenAI`",
                f"ratio **{clients[kind + '_ratio']:.3f}**",
            )
        )
    costs = gpu_cost.main()
    for strategy, cost in costs.items():
        rows.append(
            (
                f"GPU cost on the Modal emulator, keep-alive `{strategy}`",
                f"4 requests with 3 idle gaps longer than the scale-down window "
                f"({gpu_cost.WINDOW:g}), cold start {gpu_cost.COLD_START:g}; 1 s stands "
                "for 1 min",
                f"{cost['cold_starts']} cold starts, session {cost['session_s']:.1f} s, "
                f"billed {cost['billed_s']:.1f} s (idle tail {cost['idle_tail_s']:.1f} s)",
                f"${cost['usd_scaled']:.2f} at ${gpu_cost.GPU_PRICE_PER_HOUR}/GPU-hour "
                "(scaled to minutes)",
            )
        )
    matrix = shared_app.main()
    for strategy, outcome in matrix.items():
        rows.append(
            (
                f"4-job matrix on one Modal app (emulator), {strategy}",
                f"{shared_app.JOBS} pytest processes, {shared_app.TESTS_PER_JOB} tests, "
                f"gaps {shared_app.GAP:g} > window {shared_app.WINDOW:g}, cold start "
                f"{shared_app.COLD_START:g}; 1 s stands for 1 min",
                f"{outcome['cold_starts']} cold starts, billed {outcome['billed_s']:.1f} s "
                f"({outcome['jobs_passed']}/{shared_app.JOBS} jobs passed)",
                f"ratio to shared leases (autoscaler) "
                f"**{outcome['billed_s'] / matrix['shared leases (autoscaler)']['billed_s']:.2f}**",
            )
        )
    replay = record_replay.main()
    rows.append(
        (
            "Example suite on `local`, live vs replayed from cassettes",
            "one live run, one recording, one replay (`--record-mode=none`) of a copy of examples/",
            f"live {replay['live_wall_s']:.1f} s (a model server ran ~{replay['live_server_s']:.0f}"
            f" s), replay {replay['replay_wall_s']:.1f} s (no server, "
            f"{replay['replayed_requests']}/{replay['requests']} requests replayed)",
            f"ratio **{replay['ratio']:.1f}x** faster; same outcome: {replay['same_outcome']}",
        )
    )
    real = vllm_cpu.main()
    rows.append(
        (
            "Real vLLM server (vllm-cpu 0.32, SmolLM2-135M, `--enforce-eager`)",
            "spawn by the `process` provider; reference poller every 10 ms beside the "
            "plugin's wake",
            f"cold start {real['cold_start_s']:.1f} s",
            f"the plugin noticed {real['plugin_lag_s'] * 1000:.0f} ms after the reference "
            "(includes its /v1/models check)",
        )
    )
    standard = langchain_standard.main()
    rows.append(
        (
            "LangChain `ChatModelIntegrationTests` on the real vLLM CPU server",
            "recipe and a hand-configured `ChatOpenAI` in one session, same server",
            f"recipe {standard['recipe']['passed']} passed, {standard['recipe']['failed']} failed, "
            f"{standard['recipe']['skipped']} skipped",
            f"by hand {standard['hand']['passed']} passed, {standard['hand']['failed']} failed, "
            f"{standard['hand']['skipped']} skipped",
        )
    )
    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, with `benchmarks/run_all.py`.",
        "Every comparison runs side by side in the same run; ratios hold better than absolute",
        "times on a shared 2-core machine.",
        "",
        "| what | how measured | result | comparison |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", langchain_standard.markdown(standard)]
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    lines += ["", f"Commit: `{git.stdout.strip() or 'unknown'}`.", ""]
    lines += ["", cold_start_budget.markdown().rstrip(), ""]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(DOC.read_text())


if __name__ == "__main__":
    main()
