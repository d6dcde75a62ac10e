"""The two roles a pytest process plays, as plugin objects registered in `pytest_configure`.

As pytest-xdist does with `DSession` and its worker plugin, the hooks of each role live on its
own object, so that no hook has to ask "am I a worker? is anything selected?":

- `Controller`: the process that runs the session (plain pytest, or xdist's controller) with
  at least one platform selected and tests to run: it resolves, starts and wakes the
  platforms before collection, keeps them alive, hands them to xdist workers, merges the
  workers' usage and writes the reports.
- `Worker`: an xdist worker: it hands its usage counters back to the controller.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from .errors import ConfigError, PlatformError
from .runtime import WORKERINPUT_KEY, WORKEROUTPUT_KEY, Runtime


class Controller:
    """Starts, wakes, keeps alive and reports the selected platforms."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Before collection: resolve, start and wake the selected platforms."""
        from .exports import check as check_export
        from .exports import export
        from .platforms import select
        from .recording import replaying
        from .resolution import resolve_platforms
        from .session import EndpointSession, replay
        from .settings import apply_env_file

        runtime, config = self.runtime, session.config
        settings = runtime.settings
        try:
            check_export(settings)
            apply_env_file(settings.env_file_values)
            selected = select(runtime.known(), runtime.selected)
            if replaying(config):  # answered from cassettes: nothing started, woken or contacted
                runtime.ready, runtime.replay = replay(selected, _test_paths(config)), True
                export(config, settings, {n: r.endpoint for n, r in runtime.ready.items()})
                return
            platforms = resolve_platforms(selected, settings)
            runtime.session = EndpointSession(platforms, no_wake=bool(settings["no_wake"]))
        except ConfigError as error:
            raise pytest.UsageError(str(error)) from None
        progress = _progress(config)
        import httpx  # noqa: F401  (before the pre-import thread: the wake needs it first)

        if not getattr(config.option, "numprocesses", None):
            # xdist workers import their own clients; without xdist, import them during the wait.
            from .clients import prewarm_imports

            prewarm_imports()
        # Modal's own output (image builds, an ephemeral app's container logs) reaches the
        # terminal while platforms start and wake, not pytest's capture.
        capture = config.pluginmanager.get_plugin("capturemanager")
        uncaptured = capture.global_and_fixture_disabled() if capture else nullcontext()
        try:
            with uncaptured:
                runtime.session.start(
                    fail_fast=settings["unavailable"] != "skip", on_progress=progress
                )
        except PlatformError as error:
            # Stop what started before pytest stops; `pytest_unconfigure`'s close() then finds
            # nothing left, so what stopping met is printed here, as it prints it.
            for problem in runtime.session.close():
                print(f"vllm: {problem}")
            if isinstance(error, ConfigError):
                raise pytest.UsageError(str(error)) from None
            pytest.exit(str(error), returncode=error.exit_code)
        finally:
            if progress is not None:
                progress.finish()
            _tell(config, runtime.session.notes)
        runtime.ready = runtime.session.ready()
        runtime.unavailable = {name: str(err) for name, err in runtime.session.errors.items()}
        # Before xdist starts its workers (its sessionstart is trylast): they inherit these.
        export(config, settings, {name: ready.endpoint for name, ready in runtime.ready.items()})

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        """One line per woken platform, plus where each effective setting came from."""
        from .reporting import header_line, settings_line
        from .resolution import Setting

        runtime = self.runtime
        if runtime.replay:
            return [f"vllm: {name} replayed from cassettes" for name in runtime.selected]
        lines = [
            header_line(runtime.ready[name].endpoint)
            for name in runtime.selected
            if name in runtime.ready
        ]
        lines += [
            f"vllm: {name} unavailable, its tests are skipped"
            for name in runtime.selected
            if name in runtime.unavailable
        ]
        settings = runtime.settings
        unavailable = Setting(settings["unavailable"], settings.sources["unavailable"])
        if runtime.session is not None:
            for run in runtime.session.runs:
                values: dict[str, Setting[Any]] = {
                    "wake_timeout": run.platform.wake_timeout,
                    "keep_alive": run.platform.keep_alive,
                    "unavailable": unavailable,
                }
                if run.platform.app_mode is not None:
                    values["app"] = run.platform.app_mode
                lines.append(settings_line(run.name, values))
        return lines

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist: hand the woken platforms to each worker."""
        node.workerinput[WORKERINPUT_KEY] = self.runtime.to_workerinput()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: merge a finished worker's usage counters."""
        usage = getattr(node, "workeroutput", {}).get(WORKEROUTPUT_KEY)
        if usage:
            self.runtime.meter.merge(usage)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the JSON report and the GitHub step summary."""
        from .usage import markdown, write_json

        rows = self._rows()
        if self.runtime.settings["report"]:
            write_json(self.runtime.settings["report"], rows)
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(markdown(rows))

    def pytest_terminal_summary(self, terminalreporter: Any, config: pytest.Config) -> None:
        """The `vllm usage` section: requests, tokens, latency, wake and pings per platform."""
        from .usage import table_lines

        terminalreporter.write_sep("=", "vllm usage")
        for line in table_lines(self._rows()):
            terminalreporter.write_line(line)
        if self.runtime.settings["report"]:
            terminalreporter.write_line(f"vllm report written to {self.runtime.settings['report']}")

    def _rows(self) -> list[dict[str, Any]]:
        from .usage import report_rows

        runtime = self.runtime
        return report_rows(runtime.report_platforms(), runtime.meter, runtime.keep_alive_pings())


class Worker:
    """An xdist worker: uses the controller's platforms, hands its usage back."""

    def __init__(self, runtime: Runtime, workerinput: dict[str, Any]) -> None:
        self.runtime = runtime
        handover = workerinput.get(WORKERINPUT_KEY)
        if handover is not None:  # absent when the controller has nothing selected
            runtime.load_workerinput(handover)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Hand this worker's usage counters to the controller."""
        session.config.workeroutput[WORKEROUTPUT_KEY] = self.runtime.meter.snapshot()  # type: ignore[attr-defined]


def _test_paths(config: pytest.Config) -> list[Path]:
    """Where this run's tests are (their cassettes are beside them)."""
    base = Path(config.invocation_params.dir)
    return [base / arg.split("::", 1)[0] for arg in config.args] or [config.rootpath]


def _tell(config: pytest.Config, notes: list[str]) -> None:
    """Write the session's notes (`vllm: NAME: ...`) through the terminal reporter."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    for note in notes:
        if reporter is not None:
            reporter.write_line(f"vllm: {note}")


def _progress(config: pytest.Config) -> Any:
    """The live wake progress through the terminal reporter (None without one)."""
    from .reporting import WakeProgress

    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None
    tty = reporter.isatty() if callable(reporter.isatty) else reporter.isatty
    return WakeProgress(
        reporter.write_line, (lambda line: reporter.rewrite(line, erase=True)) if tty else None
    )
