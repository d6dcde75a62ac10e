"""LangChain's standard chat-model suite on the real vLLM CPU server: the plugin's recipe
(examples/langchain_standard/test_standard_chat.py, `PlatformChatModelTests`) beside the same
suite on a `ChatOpenAI(base_url=..., api_key=..., model=...)` configured by hand
(examples/langchain_standard/hand_configured.py), in ONE pytest session, so both run against
the same server (one cold start). The server requires an API key (VLLM_API_KEY), as a deployed
one would.

    .venv/bin/python benchmarks/langchain_standard.py      # prints the Markdown section

`run_routes()` is also what the vLLM CPU test tier runs (tests/test_vllm_cpu_langchain.py), so
the numbers in docs/benchmarks.md and the guard measure the same thing. Needs
scripts/setup_vllm_cpu.py and langchain-tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "langchain_standard"
PLATFORM_FILE = ROOT / "examples" / "platforms" / "vllm-cpu.toml"
# JUnit class names of the two routes.
ROUTES = {
    "recipe": "test_standard_chat.TestPlatformChatModel",
    "hand": "hand_configured.TestHandConfiguredChatOpenAI",
}
LABELS = {
    "recipe": "recipe: `PlatformChatModelTests` (the plugin's `ChatOpenAI`, flags from "
    "`capabilities`)",
    "hand": "by hand: `ChatOpenAI(base_url=..., api_key=..., model=...)`, langchain-tests' "
    "default flags",
}
BENCH_KEY = "sk-bench-langchain-standard"


def run_routes(
    *platform_args: str, env: dict[str, str] | None = None, timeout: float = 3000, nice: int = 0
) -> dict[str, Any]:
    """Run both routes in one session; per route: counts, seconds and test names by outcome.

    `nice` lowers the priority of the session and of the server it starts (the test tier runs
    it beside timing-sensitive tests on 2 cores).
    """
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "junit.xml"
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *platform_args,
                "test_standard_chat.py",
                "hand_configured.py",
                "-p",
                "no:cacheprovider",
                f"--junitxml={report}",
            ],
            cwd=RECIPE,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        seconds = time.monotonic() - started
        output = done.stdout + done.stderr
        if not report.exists():
            raise RuntimeError(
                f"the run wrote no report (exit {done.returncode}):\n{output[-3000:]}"
            )
        tree = ET.parse(report)
    result: dict[str, Any] = {"session_s": round(seconds, 1), "output": output}
    for route, classname in ROUTES.items():
        names: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
        messages: dict[str, str] = {}
        spent = 0.0
        for case in tree.iter("testcase"):
            if case.get("classname") != classname:
                continue
            spent += float(case.get("time", 0))
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    messages[case.get("name", "")] = child.get("message", "").splitlines()[0]
            tags = {child.tag for child in case}
            outcome = (
                "failed"
                if tags & {"failure", "error"}
                else "skipped"
                if "skipped" in tags
                else "passed"
            )
            names[outcome].append(case.get("name", ""))
        result[route] = {
            **{outcome: len(found) for outcome, found in names.items()},
            "seconds": round(spent, 1),
            "names": names,
            "messages": messages,
        }
    return result


def main() -> dict[str, Any]:
    """The two routes on the vLLM CPU platform (examples/platforms/vllm-cpu.toml)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["VLLM_API_KEY"] = BENCH_KEY
    result = run_routes(f"--vllm-config={PLATFORM_FILE}", "--vllm-platform=vllm-cpu", env=env)
    result["langchain_tests"] = version("langchain-tests")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The section for docs/benchmarks.md: counts per route and the tests that differ."""
    recipe, hand = result["recipe"], result["hand"]
    lines = [
        "## LangChain standard suite on the real vLLM CPU server",
        "",
        f"`ChatModelIntegrationTests` (langchain-tests {result['langchain_tests']}) on vllm-cpu "
        "0.32 serving SmolLM2-135M-Instruct (2 cores, `max_new_tokens` 256, API key required), "
        "both routes in one pytest session against the same server "
        f"({result['session_s']:.0f} s with its cold start); `benchmarks/langchain_standard.py`.",
        "",
        "| route | passed | failed | skipped | time in tests |",
        "|---|---:|---:|---:|---:|",
    ]
    for route in ("recipe", "hand"):
        row = result[route]
        lines.append(
            f"| {LABELS[route]} | {row['passed']} | {row['failed']} | {row['skipped']} | "
            f"{row['seconds']:.0f} s |"
        )
    only_recipe = sorted(set(recipe["names"]["passed"]) - set(hand["names"]["passed"]))
    only_hand = sorted(set(hand["names"]["passed"]) - set(recipe["names"]["passed"]))

    def why(route: dict[str, Any], name: str) -> str:
        return route["messages"].get(name, "")[:90].replace("|", "/")

    lines += ["", "Passed through the recipe only (the other route's message):"]
    lines += [f"- `{name}`: {why(hand, name)}" for name in only_recipe] or ["- none"]
    lines += ["", "Passed by hand only:"]
    lines += [f"- `{name}`: {why(recipe, name)}" for name in only_hand] or ["- none"]

    def outcome(route: dict[str, Any], name: str) -> str:
        return next((o for o, found in route["names"].items() if name in found), "absent")

    lines += ["", "Failed through the recipe (its message; the outcome by hand):"]
    lines += [
        f"- `{name}`: {why(recipe, name)} (by hand: {outcome(hand, name)})"
        for name in recipe["names"]["failed"]
    ] or ["- none"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    measured = main()
    print(markdown(measured))
    for route in ("recipe", "hand"):
        print(route, {k: measured[route][k] for k in ("passed", "failed", "skipped", "seconds")})
