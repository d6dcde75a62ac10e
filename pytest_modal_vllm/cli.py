"""The `modal-vllm` command: list, wake, inspect, deploy, release, stop and serve platforms.

It resolves settings and platforms through the same functions as the plugin: the rootdir and
ini values are found as pytest finds them from the current directory, then built-ins,
`pyproject.toml`, `--config` / `MODAL_VLLM_CONFIG` / ini `vllm_config`, and `.env` (variables
already set win). Exit codes follow the plugin: 0 ok, 4 configuration error, 75 endpoint not
ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import settings as settings_module
from .errors import EXIT_CONFIG, ConfigError, PlatformError
from .platforms import load_platforms, select
from .resolution import ResolvedPlatform, resolve_platform

if TYPE_CHECKING:
    from .reporting import WakeProgress


def _settings(args: argparse.Namespace, **cli: object) -> settings_module.Settings:
    """The settings as pytest would resolve them here (its ini included), .env applied."""
    rootdir, ini = settings_module.read_ini(Path.cwd())
    settings = settings_module.load(
        {"config": args.config, "env_file": args.env_file, **cli}, ini, rootdir
    )
    settings_module.apply_env_file(settings.env_file_values)
    return settings


def _platform(
    args: argparse.Namespace, settings: settings_module.Settings, *, contact: bool = True
) -> ResolvedPlatform:
    known = load_platforms(settings.rootdir, settings["config"])
    return resolve_platform(select(known, [args.name])[0], settings, contact=contact)


def _progress_writer() -> WakeProgress:
    from .reporting import WakeProgress

    tty = sys.stderr.isatty()

    def write_line(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def rewrite(line: str) -> None:
        print("\r\x1b[2K" + line, end="", file=sys.stderr, flush=True)

    return WakeProgress(write_line, rewrite if tty else None)


# ---------------------------------------------------------------------------- commands


def cmd_platforms(args: argparse.Namespace) -> int:
    """List every known platform."""
    from .reporting import platform_rows, platform_table

    settings = _settings(args)
    known = load_platforms(settings.rootdir, settings["config"])
    if args.json:
        print(json.dumps(platform_rows(known), indent=2))
    else:
        print("\n".join(platform_table(known)))
    return 0


def cmd_wake(args: argparse.Namespace) -> int:
    """Wake one platform with a live progress display."""
    from .reporting import header_line
    from .session import EndpointSession

    settings = _settings(args, wake_timeout=args.timeout, keep_alive="off")
    platform = _platform(args, settings)
    session = EndpointSession([platform])
    progress = _progress_writer()
    try:
        session.start(on_progress=progress)
    finally:
        progress.finish()
        for note in session.notes:
            print(note, file=sys.stderr)
        session.close()
    print(header_line(session.endpoints[platform.name]).replace("vllm: ", "", 1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a stub or process platform in the foreground until Ctrl-C."""
    from .session import EndpointSession

    settings = _settings(args, keep_alive="off")
    platform = _platform(args, settings)
    if platform.kind not in ("stub", "process"):
        raise ConfigError(
            f"'serve' runs stub and process platforms; this one is {platform.kind!r}",
            f"use 'modal-vllm wake {platform.name}' for a remote endpoint",
            platform=platform.name,
        )
    session = EndpointSession([platform])
    progress = _progress_writer()
    try:
        session.start(on_progress=progress)
        progress.finish()
        endpoint = session.endpoints[platform.name]
        print(
            f"{platform.name} serving at {endpoint.base_url} model={endpoint.model} "
            "(Ctrl-C to stop)",
            flush=True,
        )
        while True:
            failure = session.runs[0].provider.failure() if session.runs[0].provider else None
            if failure:
                print(f"{platform.name}: the server process died: {failure}", file=sys.stderr)
                return 75
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        session.close()


def cmd_status(args: argparse.Namespace) -> int:
    """Say where a platform is and what state it is in, without waking it."""
    from .providers import make_provider

    platform = _platform(args, _settings(args))
    print(f"{platform.name}: kind={platform.kind} source={platform.definition.source}")
    for line in make_provider(platform).status():
        print(f"  {line}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Deploy a modal platform's app (Modal's build output is shown)."""
    from .providers.modal import ModalProvider

    provider = ModalProvider(_modal_platform(args, "deploy"))
    found = provider.deploy(force=args.force)
    for note in provider.notes:
        print(f"{provider.platform.name}: {note}" + (f" at {found.url}" if found.url else ""))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """Clear leases of sessions that ended without cleaning up; restore settings if none left."""
    from .providers.modal import ModalProvider

    provider = ModalProvider(_modal_platform(args, "release"))
    done = provider.release(everything=args.all)
    name = provider.platform.name
    for line in done or ["nothing to release: no expired lease, settings as they should be"]:
        print(f"{name}: {line}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Stop a deployed modal platform's app."""
    from .providers.modal import ModalProvider

    platform = _modal_platform(args, "stop")
    app = platform.definition.app
    if ModalProvider(platform).stop_app():
        print(f"{platform.name}: stopped app {app!r}")
    else:
        print(f"{platform.name}: app {app!r} is not deployed, nothing to stop")
    return 0


def _modal_platform(args: argparse.Namespace, verb: str) -> ResolvedPlatform:
    """The named platform, which must be a modal one (no request is sent to it)."""
    platform = _platform(args, _settings(args), contact=False)
    if platform.kind != "modal":
        raise ConfigError(
            f"'{verb}' applies to modal platforms; this one is {platform.kind!r}",
            "pick a modal platform (modal-vllm platforms lists them)",
            platform=platform.name,
        )
    return platform


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `modal-vllm`."""
    parser = argparse.ArgumentParser(
        prog="modal-vllm", description="Manage the LLM platforms of pytest-modal-vllm."
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="PATH",
        help="extra platform TOML file (env MODAL_VLLM_CONFIG)",
    )
    parser.add_argument(
        "--env-file",
        default=None,
        metavar="PATH",
        help="dotenv file to load (default .env; empty string: none)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("platforms", help="list known platforms")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=cmd_platforms)
    wake = commands.add_parser("wake", help="wake a platform and wait until it is ready")
    wake.add_argument("name")
    wake.add_argument(
        "--timeout",
        type=settings_module.positive_seconds,
        default=None,
        metavar="SECONDS",
        help="wake timeout (default: the platform's)",
    )
    wake.set_defaults(run=cmd_wake)
    deploy = commands.add_parser(
        "deploy", help="deploy a modal platform's app (skipped when deployed with its settings)"
    )
    deploy.add_argument("name")
    deploy.add_argument("--force", action="store_true", help="deploy even with the same settings")
    deploy.set_defaults(run=cmd_deploy)
    release = commands.add_parser(
        "release", help="clear leases of sessions that ended without cleaning up"
    )
    release.add_argument("name")
    which = release.add_mutually_exclusive_group()
    which.add_argument("--expired", action="store_true", help="only expired leases (the default)")
    which.add_argument("--all", action="store_true", help="every lease, live ones included")
    release.set_defaults(run=cmd_release)
    for name, helptext, run in (
        ("status", "where a platform is and its state; wakes nothing", cmd_status),
        ("stop", "stop a deployed modal platform's app", cmd_stop),
        ("serve", "run a stub or process platform in the foreground", cmd_serve),
    ):
        command = commands.add_parser(name, help=helptext)
        command.add_argument("name")
        command.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `modal-vllm`; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        # argparse exits 0 for --help and 2 for a usage error: a configuration error here,
        # as in pytest (exit 4).
        return EXIT_CONFIG if done.code == 2 else int(done.code or 0)
    try:
        return int(args.run(args))
    except PlatformError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except ValueError as error:  # e.g. an invalid value caught by settings validation
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
