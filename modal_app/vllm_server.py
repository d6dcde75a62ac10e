"""One parameterized Modal app that serves any vLLM-supported model behind an OpenAI API.

Deploy it as it is::

    modal deploy modal_app/vllm_server.py
    MODEL_NAME=Qwen/Qwen3-8B-FP8 TOOL_CALL_PARSER=hermes APP_NAME=modal-vllm-qwen \\
        modal deploy modal_app/vllm_server.py

or through the plugin (`modal-vllm deploy NAME`, `pytest --vllm-deploy`), which imports this
file with the platform's `deploy_env` applied to the environment.

Settings are environment variables read when this file is imported (at deploy time):

=========================  ===================================================================
`MODEL_NAME`               Hugging Face model id (`RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8`)
`MODEL_REVISION`           commit/branch/tag to load (the default branch unless set)
`APP_NAME`                 Modal app name: `modal-vllm-llama` for the default model, else
                           `modal-vllm-<model slug>` (`Qwen/Qwen3-8B-FP8` gives
                           `modal-vllm-qwen3-8b-fp8`)
`GPU`                      Modal GPU spec (`H100:1`); the count after `:` sets tensor parallelism
`SCALEDOWN_WINDOW`         seconds an idle container stays up (300)
`STARTUP_TIMEOUT`          seconds vLLM may take to start listening (900)
`MAX_MODEL_LEN`            vLLM `--max-model-len` (vLLM's default: the model's)
`FAST_BOOT`                `--enforce-eager`: shorter cold starts, slower decoding (on)
`TOOL_CALL_PARSER`         turns on tool calling: `--enable-auto-tool-choice --tool-call-parser X`
`VLLM_ARGS`                extra vLLM flags, split like a shell would (`"--max-num-seqs 16"`)
`API_KEY_SECRET`           Modal Secret holding `VLLM_API_KEY` (`vllm-api-key`)
`ALLOW_UNAUTHENTICATED`    serve without `--api-key` (off; prints a warning at deploy)
`MAX_INPUTS`               concurrent requests per container, `@modal.concurrent` (32)
`VLLM_VERSION`             the vLLM release installed in the image (pinned below)
`HF_SECRET`                Modal Secret holding `HF_TOKEN`, for gated models (none)
`PROXY_AUTH`               require Modal proxy auth (`Modal-Key`/`Modal-Secret` headers) (off)
=========================  ===================================================================

Booleans accept 1/0, true/false, yes/no, on/off. The settings travel into the container as
environment variables (a `modal.Secret.from_dict`), so the container rebuilds exactly the
command the deployer saw. The API key never does: it comes from the Modal Secret at container
start and is never printed.

Everything above the Modal section is pure standard library: `Settings.from_env` and
`build_vllm_command` can be imported and tested without a Modal account or network, and
without `modal` installed at all.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_MODEL = "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
DEFAULT_APP_NAME = "modal-vllm-llama"
DEFAULT_GPU = "H100:1"
DEFAULT_API_KEY_SECRET = "vllm-api-key"
# vLLM 0.27.1 (a bugfix release) ships torch 2.13 built for CUDA 13.0; FlashInfer compiles some
# kernels at start-up, so the image carries the matching CUDA 13.0 toolkit (nvcc). Modal's
# hosts run driver R580, which supports CUDA 13.
DEFAULT_VLLM_VERSION = "0.27.1"
CUDA_IMAGE = "nvidia/cuda:13.0.1-devel-ubuntu24.04"
PYTHON_VERSION = "3.12"
VLLM_PORT = 8000
MINUTES = 60

# Revisions to pin per model, so a repository update cannot change what a test suite talks
# to. Empty on purpose: commit hashes could not be verified from where this was written (no
# access to the Hugging Face Hub), and a wrong pin breaks every deploy. Pin your own with
# `MODEL_REVISION=<commit>`; `MODEL_REVISION=main` follows the default branch.
KNOWN_REVISIONS: dict[str, str] = {}

# Where the container keeps the caches that the Volumes persist.
HF_CACHE_DIR = "/root/.cache/huggingface"
VLLM_CACHE_DIR = "/root/.cache/vllm"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean: use 1/0, true/false, yes/no or on/off")


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


def _text(environ: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (a blank variable means "default")."""
    value = environ.get(name, "").strip()
    return value or None


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
    vllm_args: tuple[str, ...] = field(default_factory=tuple)
    api_key_secret: str = DEFAULT_API_KEY_SECRET
    allow_unauthenticated: bool = False
    max_inputs: int = 32
    vllm_version: str = DEFAULT_VLLM_VERSION
    hf_secret: str | None = None
    proxy_auth: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `environ` (default `os.environ`); `ValueError` if one is bad."""
        env = os.environ if environ is None else environ
        model = _text(env, "MODEL_NAME") or DEFAULT_MODEL
        gpu = _text(env, "GPU") or DEFAULT_GPU
        gpu_count(gpu)  # validate now, at deploy time, not in the container
        revision = _text(env, "MODEL_REVISION")
        if revision is None:
            revision = KNOWN_REVISIONS.get(model)
        elif revision == "main":
            revision = None  # "follow the default branch": vLLM's own default
        return cls(
            model_name=model,
            model_revision=revision,
            app_name=_text(env, "APP_NAME") or default_app_name(model),
            gpu=gpu,
            scaledown_window=_int(env, "SCALEDOWN_WINDOW", 5 * MINUTES) or 5 * MINUTES,
            startup_timeout=_int(env, "STARTUP_TIMEOUT", 15 * MINUTES) or 15 * MINUTES,
            max_model_len=_int(env, "MAX_MODEL_LEN", None),
            fast_boot=_bool(env, "FAST_BOOT", True),
            tool_call_parser=_text(env, "TOOL_CALL_PARSER"),
            vllm_args=tuple(shlex.split(env.get("VLLM_ARGS", ""))),
            api_key_secret=_text(env, "API_KEY_SECRET") or DEFAULT_API_KEY_SECRET,
            allow_unauthenticated=_bool(env, "ALLOW_UNAUTHENTICATED", False),
            max_inputs=_int(env, "MAX_INPUTS", 32) or 32,
            vllm_version=_text(env, "VLLM_VERSION") or DEFAULT_VLLM_VERSION,
            hf_secret=_text(env, "HF_SECRET"),
            proxy_auth=_bool(env, "PROXY_AUTH", False),
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
            "MAX_INPUTS": str(self.max_inputs),
            "VLLM_VERSION": self.vllm_version,
            "PROXY_AUTH": "1" if self.proxy_auth else "0",
        }
        # `main` stands for "no pin", so that an unpinned known model stays unpinned.
        env["MODEL_REVISION"] = self.model_revision or "main"
        if self.max_model_len is not None:
            env["MAX_MODEL_LEN"] = str(self.max_model_len)
        if self.tool_call_parser:
            env["TOOL_CALL_PARSER"] = self.tool_call_parser
        if self.hf_secret:
            env["HF_SECRET"] = self.hf_secret
        return env


def build_vllm_command(settings: Settings, api_key: str | None = None) -> list[str]:
    """The `vllm serve` argv for `settings`; `--api-key` only when `api_key` is given.

    Pure: no environment, no network. `VLLM_ARGS` come last, so they can override any flag
    set here (vLLM's parser keeps the last value).
    """
    cmd = ["vllm", "serve", settings.model_name]
    if settings.model_revision:
        cmd += ["--revision", settings.model_revision]
    # The model answers to its own id and to the short alias `llm`.
    cmd += ["--served-model-name", settings.model_name, "llm"]
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
    if api_key is not None:
        cmd += ["--api-key", api_key]
    cmd += list(settings.vllm_args)
    return cmd


def redact_command(cmd: Sequence[str]) -> str:
    """The command as one shell line, with the value of `--api-key` replaced by `***`."""
    shown = list(cmd)
    for index, arg in enumerate(shown):
        if arg == "--api-key" and index + 1 < len(shown):
            shown[index + 1] = "***"
        elif arg.startswith("--api-key="):
            shown[index] = "--api-key=***"
    return shlex.join(shown)


def unauthenticated_warning(settings: Settings) -> str:
    """The deploy-time warning for `ALLOW_UNAUTHENTICATED`."""
    return (
        f"WARNING: {settings.app_name}: ALLOW_UNAUTHENTICATED is set, vLLM runs without "
        "--api-key: anyone who knows the URL can use (and bill) this GPU endpoint. Unset it "
        f"and create the Modal Secret {settings.api_key_secret!r} with VLLM_API_KEY to secure it."
    )


SETTINGS = Settings.from_env()

# ------------------------------------------------------------------------ the Modal app
# Everything below needs `modal`, but no token and no network: `modal.App`, `Image`,
# `Volume.from_name` and `Secret.from_name` are lazy until a deploy or run hydrates them.

try:
    import modal
except ImportError:  # pragma: no cover - the pure part above stays importable without modal
    modal = None  # type: ignore[assignment]

if modal is not None:
    if modal.is_local() and SETTINGS.allow_unauthenticated:
        print(unauthenticated_warning(SETTINGS), file=sys.stderr)

    image = (
        modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON_VERSION)
        # The CUDA image's entrypoint prints a banner and would wrap Modal's own command.
        .entrypoint([])
        .uv_pip_install(f"vllm=={SETTINGS.vllm_version}")
        # Faster weight downloads through Hugging Face's Xet storage.
        .env({"HF_XET_HIGH_PERFORMANCE": "1"})
    )

    # Weights and vLLM's compilation artefacts outlive containers; the names match Modal's
    # examples, so weights already downloaded by them are reused.
    hf_cache_volume = modal.Volume.from_name("huggingface-cache", create_if_missing=True)
    vllm_cache_volume = modal.Volume.from_name("vllm-cache", create_if_missing=True)

    secrets = [modal.Secret.from_dict(dict(SETTINGS.to_env()))]
    if not SETTINGS.allow_unauthenticated:
        # `required_keys` makes a deploy fail at once when the Secret lacks the key.
        secrets.append(
            modal.Secret.from_name(SETTINGS.api_key_secret, required_keys=["VLLM_API_KEY"])
        )
    if SETTINGS.hf_secret:
        secrets.append(modal.Secret.from_name(SETTINGS.hf_secret, required_keys=["HF_TOKEN"]))

    app = modal.App(SETTINGS.app_name)

    @app.function(
        image=image,
        gpu=SETTINGS.gpu,
        scaledown_window=SETTINGS.scaledown_window,
        # A web server's `timeout` bounds each request and the start-up: keep it above both.
        timeout=max(SETTINGS.startup_timeout, 20 * MINUTES),
        volumes={HF_CACHE_DIR: hf_cache_volume, VLLM_CACHE_DIR: vllm_cache_volume},
        secrets=secrets,
    )
    @modal.concurrent(max_inputs=SETTINGS.max_inputs)
    @modal.web_server(
        port=VLLM_PORT,
        startup_timeout=SETTINGS.startup_timeout,
        requires_proxy_auth=SETTINGS.proxy_auth,
    )
    def serve() -> None:
        """Start vLLM in the background; Modal routes requests once port 8000 answers."""
        import subprocess

        api_key = os.environ.get("VLLM_API_KEY") or None
        if api_key is None and not SETTINGS.allow_unauthenticated:
            raise RuntimeError(
                f"the Modal Secret {SETTINGS.api_key_secret!r} has no VLLM_API_KEY: create it "
                f"with `modal secret create {SETTINGS.api_key_secret} VLLM_API_KEY=...`, or "
                "deploy with ALLOW_UNAUTHENTICATED=1"
            )
        if SETTINGS.allow_unauthenticated:
            api_key = None
        cmd = build_vllm_command(SETTINGS, api_key=api_key)
        print("starting vLLM:", redact_command(cmd), flush=True)
        subprocess.Popen(cmd)
