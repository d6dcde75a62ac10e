"""One parameterized Modal app that serves any vLLM-supported model behind an OpenAI API.

Deploy it as it is::

    modal deploy modal_app/vllm_server.py
    MODEL_NAME=Qwen/Qwen3-8B-FP8 TOOL_CALL_PARSER=hermes APP_NAME=modal-vllm-qwen \\
        modal deploy modal_app/vllm_server.py

or through the plugin (`modal-vllm deploy NAME`, `pytest --vllm-deploy`), which imports this
file with the platform's `deploy_env` as the settings.

Settings are read when this file is imported (at deploy time). When `MODAL_VLLM_SETTINGS` holds
a JSON object of setting names to string values (the plugin sets it), the settings come ONLY
from that object and the defaults below: no other variable of the shell or of `.env` can reach
a deploy. Without it (a manual `modal deploy`), they come from the environment variables:

=========================  ===================================================================
`MODEL_NAME`               Hugging Face model id (`RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8`)
`MODEL_REVISION`           commit/branch/tag to load; the models in `KNOWN_REVISIONS` are pinned
                           to the commit a public source names, others follow their default
                           branch; `main` = follow the default branch
`APP_NAME`                 Modal app name: `modal-vllm-llama` for the default model, else
                           `modal-vllm-<model slug>` (`Qwen/Qwen3-8B-FP8` gives
                           `modal-vllm-qwen3-8b-fp8`)
`GPU`                      Modal GPU spec (`H100:1`); the count after `:` sets tensor parallelism
`SCALEDOWN_WINDOW`         seconds an idle container stays up (300)
`STARTUP_TIMEOUT`          seconds vLLM may take to serve after it is started (900); a vLLM
                           that exits sooner fails the container start at once
`MAX_MODEL_LEN`            vLLM `--max-model-len` (vLLM's default: the model's)
`FAST_BOOT`                `--enforce-eager`: shorter cold starts, slower decoding (on; off by
                           default with `SNAPSHOT=1`, whose snapshot keeps the compiled graphs)
`TOOL_CALL_PARSER`         turns on tool calling: `--enable-auto-tool-choice --tool-call-parser X`
`THINKING`                 `on`/`off`: the chat template's default `enable_thinking`, through
                           `--default-chat-template-kwargs` (unset: the model's own default)
`VLLM_ARGS`                extra vLLM flags, split like a shell would (`"--max-num-seqs 16"`);
                           they come last and override the flags above
`API_KEY_SECRET`           Modal Secret holding `VLLM_API_KEY` (`vllm-api-key`)
`ALLOW_UNAUTHENTICATED`    serve without a key: no auth middleware (off; warns at deploy)
`PROXY_AUTH`               require Modal proxy auth (`Modal-Key`/`Modal-Secret` headers) (off)
`MAX_INPUTS`               concurrent requests one container takes before Modal starts another
                           (`@modal.concurrent(max_inputs=)`; `target_concurrency` in snapshot
                           mode) (32)
`MAX_CONTAINERS`           at most this many containers (1; `none` = no bound); requests beyond
                           `MAX_INPUTS x MAX_CONTAINERS` wait in Modal's queue
`SNAPSHOT`                 GPU memory snapshots: start vLLM, warm it up and put it to sleep
                           before the snapshot, wake it after a restore (off; Modal alpha)
`VLLM_VERSION`             the vLLM release installed in the image (`DEFAULT_VLLM_VERSION`)
`BASE_IMAGE`               the container image vLLM is installed into (`DEFAULT_BASE_IMAGE`)
`HF_SECRET`                Modal Secret holding `HF_TOKEN`, for gated models (none)
=========================  ===================================================================

Booleans accept 1/0, true/false, yes/no, on/off. The settings travel into the container as
`MODAL_VLLM_SETTINGS` (a `modal.Secret.from_dict`), so the container rebuilds exactly the
settings and the command the deployer saw. The API key never does: it comes from the Modal
Secret at container start, stays in the environment (vLLM and the auth middleware read
`VLLM_API_KEY`), and is never on a command line or printed.

Security (see docs/modal-app.md): vLLM's own key check guards only `/v1`, `/v2`,
`/inference` and `/cohere`; the app adds `vllm_auth.BearerAuthMiddleware` (`--middleware`),
which requires the key on every path but `/health`. `PROXY_AUTH` adds Modal's own check in
front, so that strangers cannot even start (and bill) a container.

Web endpoint: the `@modal.web_server` function `serve`; with `SNAPSHOT=1` the `@app.server`
class registered as `serve` instead (a platform points at it with `server = "serve"`).

Cold starts are logged phase by phase, one line each, for `modal app logs APP | grep phase`:
`modal-vllm: phase engine-ready after 41.2s`.

Everything above the Modal section is pure standard library: the settings, the command and
environment builders, the process helpers (start, relay output, fail fast) and the sleep/wake
helpers can be imported and tested without a Modal account or network, and without `modal`.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
DEFAULT_APP_NAME = "modal-vllm-llama"
DEFAULT_GPU = "H100:1"
DEFAULT_API_KEY_SECRET = "vllm-api-key"
# The image and vLLM release of Modal's own vLLM example (modal-labs/modal-examples,
# 06_gpu_and_ml/llm-serving/vllm_inference.py, "Run OpenAI-compatible LLM inference with Gemma
# and vLLM": `nvidia/cuda:12.9.0-devel-ubuntu22.04`, Python 3.12, `uv_pip_install("vllm==0.21.0")`).
# A devel image because FlashInfer compiles some kernels at start-up (it needs nvcc). A newer
# vLLM is one setting away, e.g. VLLM_VERSION=0.27.1 BASE_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
# (CUDA 13 builds need a host driver of the R580 branch).
DEFAULT_VLLM_VERSION = "0.21.0"
DEFAULT_BASE_IMAGE = "nvidia/cuda:12.9.0-devel-ubuntu22.04"
PYTHON_VERSION = "3.12"
VLLM_PORT = 8000
LOCAL_URL = f"http://127.0.0.1:{VLLM_PORT}"
SERVED_ALIAS = "llm"
MINUTES = 60

# Revisions pinned per model, so that a repository update cannot change what a test suite
# talks to. Each pin is the commit a public source names; `MODEL_REVISION` overrides it
# (`MODEL_REVISION=main` follows the default branch).
KNOWN_REVISIONS: dict[str, str] = {
    # modal-labs/modal-examples 06_gpu_and_ml/llm-serving/vllm_inference.py (the Llama 3.1 8B
    # FP8 version of the example, vLLM 0.9.1): MODEL_REVISION = "12fd6884...".
    "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8": "12fd6884d2585dd4d020373e7f39f74507b31866",
    # modal-labs/modal-examples 06_gpu_and_ml/llm-serving/sglang_snapshot.py ("latest commit as
    # of 2026-01") and the Qwen 3 version of vllm_inference.py: MODEL_REVISION = "220b46e3...".
    "Qwen/Qwen3-8B-FP8": "220b46e3b2180893580a4454f21f22d3ebb187d3",
}

# The auth middleware: this file's sibling, put into the image at AUTH_DIR and put on the
# vLLM process's PYTHONPATH, so that `--middleware vllm_auth.BearerAuthMiddleware` imports it.
AUTH_MODULE_FILE = Path(__file__).resolve().with_name("vllm_auth.py")
AUTH_DIR = "/opt/modal-vllm"
AUTH_MIDDLEWARE = "vllm_auth.BearerAuthMiddleware"
KEY_ENV = "VLLM_API_KEY"

# The settings as one JSON object (see the module docstring); set by the plugin, and by this
# app for its own containers.
SETTINGS_ENV = "MODAL_VLLM_SETTINGS"

# Volumes and where the container mounts them. The names match Modal's examples, so weights
# already downloaded by them are reused.
HF_CACHE_DIR = "/root/.cache/huggingface"
VLLM_CACHE_DIR = "/root/.cache/vllm"
VOLUMES: dict[str, str] = {HF_CACHE_DIR: "huggingface-cache", VLLM_CACHE_DIR: "vllm-cache"}

# Every cache that makes a second cold start faster, on a Volume. Without these variables
# inductor writes to /tmp/torchinductor_root, Triton to ~/.triton, FlashInfer to
# ~/.cache/flashinfer and the CUDA driver's PTX cache to ~/.nv: all lost with the container.
CACHE_ENV: dict[str, str] = {
    "HF_HOME": HF_CACHE_DIR,  # weights (hub/) and tokenizers
    "VLLM_CACHE_ROOT": VLLM_CACHE_DIR,  # vLLM's torch.compile artefacts and its own caches
    "TORCHINDUCTOR_CACHE_DIR": f"{VLLM_CACHE_DIR}/torchinductor",
    "TRITON_CACHE_DIR": f"{VLLM_CACHE_DIR}/triton",
    # FlashInfer's JIT kernels and downloaded cubins: $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer
    "FLASHINFER_WORKSPACE_BASE": f"{VLLM_CACHE_DIR}/flashinfer",
    "CUDA_CACHE_PATH": f"{VLLM_CACHE_DIR}/nv-compute-cache",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_NO_BOUND = frozenset({"none", "unlimited", "unbounded"})

# Every setting this app reads; `MODAL_VLLM_SETTINGS` may hold only these.
SETTING_NAMES = (
    "MODEL_NAME",
    "MODEL_REVISION",
    "APP_NAME",
    "GPU",
    "SCALEDOWN_WINDOW",
    "STARTUP_TIMEOUT",
    "MAX_MODEL_LEN",
    "FAST_BOOT",
    "TOOL_CALL_PARSER",
    "THINKING",
    "VLLM_ARGS",
    "API_KEY_SECRET",
    "ALLOW_UNAUTHENTICATED",
    "PROXY_AUTH",
    "MAX_INPUTS",
    "MAX_CONTAINERS",
    "SNAPSHOT",
    "VLLM_VERSION",
    "BASE_IMAGE",
    "HF_SECRET",
)


def _optional_bool(environ: Mapping[str, str], name: str) -> bool | None:
    value = environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{name}={environ[name]!r} is not a boolean: use 1/0, true/false, yes/no or on/off"
    )


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = _optional_bool(environ, name)
    return default if value is None else value


def _int(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be above 0")
    return value


def _bound(environ: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A positive whole number, or None for `none` (no bound)."""
    if environ.get(name, "").strip().lower() in _NO_BOUND:
        return None
    return _int(environ, name, default)


def _text(environ: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (a blank variable means "default")."""
    value = environ.get(name, "").strip()
    return value or None


def settings_source(environ: Mapping[str, str]) -> Mapping[str, str]:
    """Where the settings come from: the JSON object in `MODAL_VLLM_SETTINGS` when it is set
    (and then nothing else of `environ`), else `environ` itself."""
    raw = environ.get(SETTINGS_ENV, "")
    if not raw.strip():
        return environ
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{SETTINGS_ENV} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{SETTINGS_ENV} must be a JSON object of setting names to strings")
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        raise ValueError(
            f"{SETTINGS_ENV} names unknown settings {unknown}; this app reads only "
            + ", ".join(SETTING_NAMES)
        )
    not_text = sorted(key for key, value in data.items() if not isinstance(value, str))
    if not_text:
        raise ValueError(f"{SETTINGS_ENV}: the values of {not_text} must be strings")
    return data


def default_app_name(model_name: str) -> str:
    """`modal-vllm-llama` for the default model, else `modal-vllm-<slug of the model id>`."""
    if model_name == DEFAULT_MODEL:
        return DEFAULT_APP_NAME
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.rsplit("/", 1)[-1].lower()).strip("-")
    # Modal app names must be shorter than 64 characters.
    return f"modal-vllm-{slug}"[:63].rstrip("-")


def gpu_count(gpu: str) -> int:
    """The number of GPUs in a Modal GPU spec: `H100:2` -> 2, `H100` -> 1."""
    _, sep, count = gpu.partition(":")
    if not sep:
        return 1
    try:
        value = int(count.rstrip("!"))
    except ValueError:
        raise ValueError(f"GPU={gpu!r}: the part after ':' must be a GPU count") from None
    if value <= 0:
        raise ValueError(f"GPU={gpu!r}: the GPU count must be above 0")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the Modal app is parameterized by; see the module docstring."""

    model_name: str = DEFAULT_MODEL
    model_revision: str | None = KNOWN_REVISIONS.get(DEFAULT_MODEL)
    app_name: str = DEFAULT_APP_NAME
    gpu: str = DEFAULT_GPU
    scaledown_window: int = 5 * MINUTES
    startup_timeout: int = 15 * MINUTES
    max_model_len: int | None = None
    fast_boot: bool = True
    tool_call_parser: str | None = None
    thinking: bool | None = None
    vllm_args: tuple[str, ...] = field(default_factory=tuple)
    api_key_secret: str = DEFAULT_API_KEY_SECRET
    allow_unauthenticated: bool = False
    proxy_auth: bool = False
    max_inputs: int = 32
    max_containers: int | None = 1
    snapshot: bool = False
    vllm_version: str = DEFAULT_VLLM_VERSION
    base_image: str = DEFAULT_BASE_IMAGE
    hf_secret: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `environ` (default `os.environ`); `ValueError` if one is bad.

        With `MODAL_VLLM_SETTINGS` set, only its JSON object counts (see `settings_source`).
        """
        env = settings_source(os.environ if environ is None else environ)
        model = _text(env, "MODEL_NAME") or DEFAULT_MODEL
        gpu = _text(env, "GPU") or DEFAULT_GPU
        gpu_count(gpu)  # validate now, at deploy time, not in the container
        revision = _text(env, "MODEL_REVISION")
        if revision is None:
            revision = KNOWN_REVISIONS.get(model)
        elif revision == "main":
            revision = None  # "follow the default branch": vLLM's own default
        snapshot = _bool(env, "SNAPSHOT", False)
        allow_unauthenticated = _bool(env, "ALLOW_UNAUTHENTICATED", False)
        proxy_auth = _bool(env, "PROXY_AUTH", False)
        if snapshot and allow_unauthenticated and not proxy_auth:
            raise ValueError(
                "SNAPSHOT=1 turns on vLLM's dev-mode routes (/sleep, /wake_up, "
                "/collective_rpc, ...), which only the API key guards: unset "
                "ALLOW_UNAUTHENTICATED, or set PROXY_AUTH=1 so that only your workspace "
                "reaches the server"
            )
        return cls(
            model_name=model,
            model_revision=revision,
            app_name=_text(env, "APP_NAME") or default_app_name(model),
            gpu=gpu,
            scaledown_window=_int(env, "SCALEDOWN_WINDOW", 5 * MINUTES) or 5 * MINUTES,
            startup_timeout=_int(env, "STARTUP_TIMEOUT", 15 * MINUTES) or 15 * MINUTES,
            max_model_len=_int(env, "MAX_MODEL_LEN", None),
            # Eager mode by default, except with snapshots: the snapshot keeps what
            # torch.compile and CUDA graph capture made, so a restore does not pay for them.
            fast_boot=_bool(env, "FAST_BOOT", not snapshot),
            tool_call_parser=_text(env, "TOOL_CALL_PARSER"),
            thinking=_optional_bool(env, "THINKING"),
            vllm_args=tuple(shlex.split(env.get("VLLM_ARGS", ""))),
            api_key_secret=_text(env, "API_KEY_SECRET") or DEFAULT_API_KEY_SECRET,
            allow_unauthenticated=allow_unauthenticated,
            proxy_auth=proxy_auth,
            max_inputs=_int(env, "MAX_INPUTS", 32) or 32,
            max_containers=_bound(env, "MAX_CONTAINERS", 1),
            snapshot=snapshot,
            vllm_version=_text(env, "VLLM_VERSION") or DEFAULT_VLLM_VERSION,
            base_image=_text(env, "BASE_IMAGE") or DEFAULT_BASE_IMAGE,
            hf_secret=_text(env, "HF_SECRET"),
        )

    def to_env(self) -> dict[str, str]:
        """The settings as environment variables; `Settings.from_env(s.to_env()) == s`."""
        env = {
            "MODEL_NAME": self.model_name,
            "APP_NAME": self.app_name,
            "GPU": self.gpu,
            "SCALEDOWN_WINDOW": str(self.scaledown_window),
            "STARTUP_TIMEOUT": str(self.startup_timeout),
            "FAST_BOOT": "1" if self.fast_boot else "0",
            "VLLM_ARGS": shlex.join(self.vllm_args),
            "API_KEY_SECRET": self.api_key_secret,
            "ALLOW_UNAUTHENTICATED": "1" if self.allow_unauthenticated else "0",
            "PROXY_AUTH": "1" if self.proxy_auth else "0",
            "MAX_INPUTS": str(self.max_inputs),
            "MAX_CONTAINERS": "none" if self.max_containers is None else str(self.max_containers),
            "SNAPSHOT": "1" if self.snapshot else "0",
            "VLLM_VERSION": self.vllm_version,
            "BASE_IMAGE": self.base_image,
        }
        # `main` stands for "no pin", so that an unpinned known model stays unpinned.
        env["MODEL_REVISION"] = self.model_revision or "main"
        if self.max_model_len is not None:
            env["MAX_MODEL_LEN"] = str(self.max_model_len)
        if self.tool_call_parser:
            env["TOOL_CALL_PARSER"] = self.tool_call_parser
        if self.thinking is not None:
            env["THINKING"] = "on" if self.thinking else "off"
        if self.hf_secret:
            env["HF_SECRET"] = self.hf_secret
        return env


def build_vllm_command(settings: Settings) -> list[str]:
    """The `vllm serve` argv for `settings`. It never holds the API key (see `vllm_environment`).

    Pure: no environment, no network. `VLLM_ARGS` come last, so they can override any flag
    set here (vLLM's parser keeps the last value).
    """
    cmd = ["vllm", "serve", settings.model_name]
    if settings.model_revision:
        cmd += ["--revision", settings.model_revision]
    # The model answers to its own id and to the short alias `llm`.
    cmd += ["--served-model-name", settings.model_name, SERVED_ALIAS]
    cmd += ["--host", "0.0.0.0", "--port", str(VLLM_PORT), "--uvicorn-log-level", "info"]
    tensor_parallel = gpu_count(settings.gpu)
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if settings.max_model_len is not None:
        cmd += ["--max-model-len", str(settings.max_model_len)]
    if settings.fast_boot:
        # No torch.compile and no CUDA graph capture: cold starts of under a minute instead
        # of several, at some cost in decoding speed.
        cmd.append("--enforce-eager")
    if settings.tool_call_parser:
        # Without these flags vLLM answers `tool_choice="auto"` with 400.
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    if settings.thinking is not None:
        # Request-level `chat_template_kwargs` still win over this server default.
        kwargs = json.dumps({"enable_thinking": settings.thinking})
        cmd += ["--default-chat-template-kwargs", kwargs]
    if settings.snapshot:
        # `/sleep` frees the GPU memory before the snapshot; `/wake_up` restores it.
        cmd.append("--enable-sleep-mode")
    if not settings.allow_unauthenticated:
        cmd += ["--middleware", AUTH_MIDDLEWARE]
    cmd += list(settings.vllm_args)
    return cmd


class MissingApiKey(RuntimeError):
    """The container has no `VLLM_API_KEY`, and the settings do not allow serving without."""


def vllm_environment(
    settings: Settings, base_env: Mapping[str, str], *, auth_dir: str = AUTH_DIR
) -> dict[str, str]:
    """The environment of the vLLM process: `base_env`, plus what the settings need.

    Closed (the default): `VLLM_API_KEY` must be set (vLLM's own check and the middleware
    read it from here, never from argv) and `auth_dir` leads `PYTHONPATH` so that vLLM can
    import the middleware. `ALLOW_UNAUTHENTICATED`: the key is removed, so that no check
    is on. `SNAPSHOT`: vLLM's dev-mode routes (`/sleep`, `/wake_up`) and single-threaded
    inductor compilation (Modal's advice for GPU snapshots).
    """
    env = dict(base_env)
    env.pop(SETTINGS_ENV, None)  # the app's own business, not vLLM's
    if settings.allow_unauthenticated:
        env.pop(KEY_ENV, None)
    else:
        if not env.get(KEY_ENV, "").strip():
            raise MissingApiKey(
                f"the Modal Secret {settings.api_key_secret!r} has no {KEY_ENV}: create it "
                f"with `modal secret create {settings.api_key_secret} {KEY_ENV}=...`, or "
                "deploy with ALLOW_UNAUTHENTICATED=1"
            )
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = auth_dir + (os.pathsep + path if path else "")
    if settings.snapshot:
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    return env


def image_env() -> dict[str, str]:
    """The environment variables of the image: every cache on a Volume, fast downloads."""
    return {"HF_XET_HIGH_PERFORMANCE": "1", **CACHE_ENV}


def snapshot_options() -> dict[str, Any]:
    """The keyword arguments that turn on CPU + GPU memory snapshots, as Modal documents them
    (modal-examples sglang_snapshot.py, vllm_low_latency_server.py; modal 1.6.4 `app.server`)."""
    return {"enable_memory_snapshot": True, "experimental_options": {"enable_gpu_snapshot": True}}


def redact_command(cmd: Sequence[str]) -> str:
    """The command as one shell line, with the value of any `--api-key` replaced by `***`
    (the app never passes one; a `VLLM_ARGS` might)."""
    shown = list(cmd)
    for index, arg in enumerate(shown):
        if arg == "--api-key" and index + 1 < len(shown):
            shown[index + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[index] = "--api-key=***"
    return shlex.join(shown)


def unauthenticated_warning(settings: Settings) -> str:
    """The deploy-time warning for `ALLOW_UNAUTHENTICATED`."""
    reach = (
        "only callers with your workspace's Modal proxy credentials can reach it"
        if settings.proxy_auth
        else "anyone who knows the URL can use (and bill) this GPU endpoint"
    )
    return (
        f"WARNING: {settings.app_name}: ALLOW_UNAUTHENTICATED is set, vLLM runs without an "
        f"API key: {reach}. Unset it and create the Modal Secret "
        f"{settings.api_key_secret!r} with {KEY_ENV} to secure it."
    )


# ------------------------------------------------------------------ phases of a cold start


def _to_stdout(line: str) -> None:
    """Write one line to this process's stdout, flushed (in a container: what `modal app logs`
    shows); one write, so that lines written from two threads do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class PhaseLog:
    """One greppable line per start-up phase: `modal-vllm: phase engine-ready after 41.2s`.

    Seconds count from the creation of the log (in the container: the import of this file),
    or from the last `restart()` (after a snapshot restore, whose clock is not the one of the
    container that took the snapshot).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._emit = emit or _to_stdout
        self._start = clock()

    def restart(self) -> None:
        self._start = self._clock()

    def mark(self, phase: str, detail: str = "") -> str:
        line = f"modal-vllm: phase {phase} after {self._clock() - self._start:.1f}s"
        if detail:
            line += f" ({detail})"
        self._emit(line)
        return line


# ------------------------------------------------------------------ start and fail fast

TAIL_LINES = 40


def describe_exit(returncode: int) -> str:
    """`code 2`, or `signal 9 (SIGKILL)` for a process killed by a signal (OOM kills)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} ({name})"
    return f"code {returncode}"


class ServerExited(RuntimeError):
    """The server process ended before it served: its exit code and its last output lines."""

    def __init__(self, returncode: int, tail: Sequence[str], seconds: float) -> None:
        self.returncode = returncode
        self.tail = list(tail)
        self.seconds = seconds
        shown = "\n".join(self.tail) if self.tail else "(no output)"
        super().__init__(
            f"vLLM exited with {describe_exit(returncode)} {seconds:.1f}s after it was started, "
            f"before it served; its last {len(self.tail)} lines of output:\n{shown}"
        )


class StartupTimeout(TimeoutError):
    """The server process was still not serving when the start-up time ran out."""

    def __init__(self, timeout: float, tail: Sequence[str]) -> None:
        self.timeout = timeout
        self.tail = list(tail)
        shown = "\n".join(self.tail) if self.tail else "(no output)"
        super().__init__(
            f"vLLM did not serve within STARTUP_TIMEOUT={timeout:g}s (it was stopped); its last "
            f"{len(self.tail)} lines of output:\n{shown}"
        )


@dataclass
class ServerProcess:
    """A started server: the process, the last lines of its output, the relay thread."""

    process: subprocess.Popen[str]
    tail: collections.deque[str]
    relay: threading.Thread
    started: float

    def last_lines(self) -> list[str]:
        return list(self.tail)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server and the processes it started (vLLM's engine cores): SIGTERM to its
        process group, SIGKILL after `timeout`; the server's exit status."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        self._signal_group(signal.SIGKILL)  # anything of the group left behind
        self.relay.join(timeout=5)
        return self.process.returncode

    def _signal_group(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def start_server(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    relay: Callable[[str], None] = _to_stdout,
) -> ServerProcess:
    """Start `cmd` with stdout and stderr merged; relay each line (default: to this process's
    stdout, which is what `modal app logs` shows) and keep the last `TAIL_LINES` of them."""
    process = subprocess.Popen(
        list(cmd),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
        # Its own process group, so that `stop()` reaches the engine processes vLLM starts.
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def pump() -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, ""):
            line = raw.rstrip("\r\n")
            tail.append(line)
            try:
                relay(line)
            except Exception:  # a broken sink must not stop the tail from filling
                pass
        process.stdout.close()

    thread = threading.Thread(target=pump, name="vllm-output", daemon=True)
    thread.start()
    return ServerProcess(process=process, tail=tail, relay=thread, started=time.monotonic())


def _answers(port: int, timeout: float) -> bool:
    """Whether the local server answers `GET /health` with 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def wait_until_serving(
    server: ServerProcess,
    *,
    port: int,
    timeout: float,
    interval: float = 0.5,
) -> float:
    """Wait until the server on 127.0.0.1:`port` answers (`GET /health` is 200) or its process
    exits, whichever comes first; the seconds it took.

    `ServerExited` at once when the process ends (exit code 0 included: a server that stops
    is not serving), with its last lines of output. `StartupTimeout` after `timeout`
    seconds, counted from now; the process is stopped first.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        returncode = server.process.poll()
        if returncode is not None:
            server.relay.join(timeout=5)  # the last lines, written just before the exit
            raise ServerExited(returncode, server.last_lines(), time.monotonic() - server.started)
        if _answers(port, timeout=min(2.0, max(interval, 0.1))):
            return time.monotonic() - start
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            server.stop()
            raise StartupTimeout(timeout, server.last_lines())
        try:
            # Returns at once when the process exits: no poll interval on the failure path.
            server.process.wait(timeout=min(interval, remaining))
        except subprocess.TimeoutExpired:
            pass


def launch_vllm(
    settings: Settings,
    environ: Mapping[str, str],
    phases: PhaseLog,
    *,
    command: Sequence[str] | None = None,
    port: int = VLLM_PORT,
    auth_dir: str = AUTH_DIR,
    relay: Callable[[str], None] | None = None,
) -> ServerProcess:
    """Start vLLM for `settings` and return once it serves; `ServerExited`/`StartupTimeout`
    (after a `phase failed` line) when it does not.

    `command` replaces the built command, `port` is where it serves, `auth_dir` holds the
    middleware, `relay` receives vLLM's output lines (the tests run a CPU build this way).
    """
    env = vllm_environment(settings, environ, auth_dir=auth_dir)
    cmd = list(command) if command is not None else build_vllm_command(settings)
    say = relay or _to_stdout
    say(f"modal-vllm: starting vLLM {settings.vllm_version}: {redact_command(cmd)}")
    server = start_server(cmd, env, relay=say)
    phases.mark("vllm-started")
    try:
        wait_until_serving(server, port=port, timeout=settings.startup_timeout)
    except (ServerExited, StartupTimeout) as error:
        server.stop(timeout=5)  # what vLLM started may outlive it
        phases.mark("failed", str(error).splitlines()[0])
        raise
    phases.mark("engine-ready")
    return server


# ------------------------------------------------------------------ sleep mode (snapshots)


class EngineControlError(RuntimeError):
    """A warm-up, sleep or wake-up request to vLLM failed."""


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call_vllm(
    base_url: str,
    api_key: str | None,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    *,
    timeout: float = 300.0,
) -> tuple[int, Any]:
    """One request to the server (no proxies: it is local); the status and the decoded JSON
    (the raw text when the answer is not JSON)."""
    data = None if body is None else json.dumps(body).encode()
    if data is None and method == "POST":
        data = b""
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except (OSError, http.client.HTTPException) as error:
        raise EngineControlError(f"{method} {path} failed: {error}") from error
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def _expect_ok(status: int, payload: Any, what: str) -> Any:
    if status != 200:
        raise EngineControlError(f"{what} answered {status}: {str(payload)[:500]}")
    return payload


def warm_up(
    base_url: str,
    api_key: str | None,
    *,
    model: str = SERVED_ALIAS,
    rounds: int = 3,
    max_tokens: int = 16,
    timeout: float = 300.0,
) -> int:
    """Run the model a few times, so that lazy initialisation, JIT kernels and compilation
    happen now (before a snapshot), not in a user's first request; the requests sent.

    Completions work for every generative model; one chat request too, tolerated with 400
    when the model has no chat template.
    """
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens}
    for _ in range(rounds):
        status, payload = call_vllm(
            base_url, api_key, "POST", "/v1/completions", body, timeout=timeout
        )
        _expect_ok(status, payload, "warm-up POST /v1/completions")
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    }
    status, payload = call_vllm(
        base_url, api_key, "POST", "/v1/chat/completions", chat, timeout=timeout
    )
    if status != 400:
        _expect_ok(status, payload, "warm-up POST /v1/chat/completions")
    return rounds + 1


def is_sleeping(base_url: str, api_key: str | None, *, timeout: float = 60.0) -> bool:
    """`GET /is_sleeping` (a dev-mode route)."""
    status, payload = call_vllm(base_url, api_key, "GET", "/is_sleeping", timeout=timeout)
    payload = _expect_ok(status, payload, "GET /is_sleeping")
    return bool(isinstance(payload, dict) and payload.get("is_sleeping"))


def sleep_engine(
    base_url: str, api_key: str | None, *, level: int = 1, timeout: float = 600.0
) -> None:
    """`POST /sleep?level=N`: level 1 moves the weights to CPU memory and drops the KV cache,
    so that the GPU snapshot is small; then check that the engine says it sleeps."""
    status, payload = call_vllm(base_url, api_key, "POST", f"/sleep?level={level}", timeout=timeout)
    _expect_ok(status, payload, f"POST /sleep?level={level}")
    if not is_sleeping(base_url, api_key):
        raise EngineControlError("POST /sleep answered 200, but /is_sleeping says awake")


def wake_engine(base_url: str, api_key: str | None, *, timeout: float = 600.0) -> None:
    """`POST /wake_up`: weights and KV cache back on the GPU; then check it is awake."""
    status, payload = call_vllm(base_url, api_key, "POST", "/wake_up", timeout=timeout)
    _expect_ok(status, payload, "POST /wake_up")
    if is_sleeping(base_url, api_key):
        raise EngineControlError("POST /wake_up answered 200, but /is_sleeping says asleep")


SETTINGS = Settings.from_env()
# The running vLLM of this container (set by `serve`), kept so that nothing collects it.
VLLM_SERVER: ServerProcess | None = None

# ------------------------------------------------------------------------ the Modal app
# Everything below needs `modal`, but no token and no network: `modal.App`, `Image`,
# `Volume.from_name` and `Secret.from_name` are lazy until a deploy or run hydrates them.

try:
    import modal
except ImportError:  # pragma: no cover - the pure part above stays importable without modal
    modal = None  # type: ignore[assignment]

if modal is not None:
    PHASES = PhaseLog()
    if not modal.is_local():
        # In the container: this file is imported by Modal's runtime once the container runs.
        PHASES.mark("container-start", f"{SETTINGS.app_name}, vLLM {SETTINGS.vllm_version}")
    elif SETTINGS.allow_unauthenticated:
        print(unauthenticated_warning(SETTINGS), file=sys.stderr)

    image = (
        modal.Image.from_registry(SETTINGS.base_image, add_python=PYTHON_VERSION)
        # The CUDA image's entrypoint prints a banner and would wrap Modal's own command.
        .entrypoint([])
        .uv_pip_install(f"vllm=={SETTINGS.vllm_version}")
        .env(image_env())
        # Last, so that editing the middleware does not rebuild the image: Modal adds the file
        # when a container starts.
        .add_local_file(AUTH_MODULE_FILE, f"{AUTH_DIR}/{AUTH_MODULE_FILE.name}")
    )

    volumes: dict[str | os.PathLike[str], modal.Volume] = {
        path: modal.Volume.from_name(name, create_if_missing=True) for path, name in VOLUMES.items()
    }

    # The container reads the same settings, and only them.
    settings_json = json.dumps(SETTINGS.to_env(), sort_keys=True)
    secrets = [modal.Secret.from_dict({SETTINGS_ENV: settings_json})]
    if not SETTINGS.allow_unauthenticated:
        # `required_keys` makes a deploy fail at once when the Secret lacks the key.
        secrets.append(modal.Secret.from_name(SETTINGS.api_key_secret, required_keys=[KEY_ENV]))
    if SETTINGS.hf_secret:
        secrets.append(modal.Secret.from_name(SETTINGS.hf_secret, required_keys=["HF_TOKEN"]))

    app = modal.App(SETTINGS.app_name)

    if not SETTINGS.snapshot:

        @app.function(
            image=image,
            gpu=SETTINGS.gpu,
            scaledown_window=SETTINGS.scaledown_window,
            # A web server's `timeout` bounds each request: keep it long for slow generations.
            timeout=max(SETTINGS.startup_timeout, 20 * MINUTES),
            # `serve()` itself waits STARTUP_TIMEOUT and fails with vLLM's output first.
            startup_timeout=SETTINGS.startup_timeout + 2 * MINUTES,
            volumes=volumes,  # type: ignore[arg-type]
            secrets=secrets,
            max_containers=SETTINGS.max_containers,
        )
        @modal.concurrent(max_inputs=SETTINGS.max_inputs)
        @modal.web_server(
            port=VLLM_PORT,
            startup_timeout=SETTINGS.startup_timeout,
            requires_proxy_auth=SETTINGS.proxy_auth,
        )
        def serve() -> None:
            """Start vLLM and return once it serves; fail the container start at once (with
            vLLM's exit code and last lines) when vLLM exits first."""
            global VLLM_SERVER
            VLLM_SERVER = launch_vllm(SETTINGS, os.environ, PHASES)

    else:

        @app.server(
            # The name the platform points at: `server = "serve"` (Server.from_name).
            name="serve",
            image=image,
            gpu=SETTINGS.gpu,
            scaledown_window=SETTINGS.scaledown_window,
            # Start-up, warm-up and sleep before the first snapshot, with room to spare.
            startup_timeout=SETTINGS.startup_timeout + 5 * MINUTES,
            volumes=volumes,  # type: ignore[arg-type]
            secrets=secrets,
            port=VLLM_PORT,
            # Servers do not take @modal.concurrent: the autoscaler targets MAX_INPUTS per
            # container; no hard cap (max_concurrency would answer 429 above it).
            target_concurrency=SETTINGS.max_inputs,
            max_containers=SETTINGS.max_containers,
            unauthenticated=not SETTINGS.proxy_auth,
            **snapshot_options(),
        )
        class VllmSnapshotServer:
            """vLLM with CPU + GPU memory snapshots (`SNAPSHOT=1`).

            Before the snapshot (`snap=True`): start vLLM with sleep mode, wait until it
            serves, warm it up, put it to sleep. After a restore (`snap=False`): wake it up.
            """

            @modal.enter(snap=True)
            def start_and_sleep(self) -> None:
                self.server = launch_vllm(SETTINGS, os.environ, PHASES)
                key = os.environ.get(KEY_ENV)
                warm_up(LOCAL_URL, key)
                PHASES.mark("warmed-up")
                sleep_engine(LOCAL_URL, key)
                PHASES.mark("asleep", "the snapshot is taken now")

            @modal.enter(snap=False)
            def wake_and_serve(self) -> None:
                PHASES.restart()
                PHASES.mark("restored", "seconds count from the restore")
                wake_engine(LOCAL_URL, os.environ.get(KEY_ENV))
                PHASES.mark("awake", "serving")

            @modal.exit()
            def stop(self) -> None:
                server = getattr(self, "server", None)
                if server is not None:
                    server.stop()

        # The same object under the name the plugin looks up in this module.
        serve = VllmSnapshotServer  # type: ignore[assignment]
