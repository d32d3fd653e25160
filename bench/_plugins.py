"""Shared bench helpers: plugin registration without entry points, model recipes, timing, ceilings, JSON.

The GPU box does not pip-install the plugins, so the scripts put the repo and the plugin folders on
``sys.path`` and register the hook modules explicitly.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
for extra in (ROOT, *(ROOT / "plugins" / p for p in ("vision_eva", "bridge_qformer", "llm_qwen"))):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = ["ROOT", "register_plugins", "recipe", "cuda_times_ms", "matmul_tflops", "copy_gbps",
           "environment", "write_result", "print_table", "sync"]


def register_plugins() -> None:
    import mllmkit_bridge_qformer.hooks as qformer
    import mllmkit_llm_qwen.hooks as qwen
    import mllmkit_vision_eva.hooks as eva

    import mllmkit.builtin.hooks as builtin
    from mllmkit.plugins import build_plugin_host, reset_plugin_host

    reset_plugin_host(build_plugin_host(entry_points=[], extra_plugins=[
        ("builtin", builtin), ("vision_eva", eva), ("bridge_qformer", qformer), ("llm_qwen", qwen)]))


def recipe(tiny: bool, *, llm_preset: str = "qwen7b_chat", eva_weights: pathlib.Path | None = None,
           device: str = "cuda:0", grad_ckpt: bool = False, qformer_precision: str = "fp32") -> dict:
    """MiniGPT4Qwen: eva_vit_g (fp16) → qformer → linear → qwen (bf16); tiny parts with ``tiny``."""
    vision = {"type": "eva_tiny" if tiny else "eva_vit_g", "precision": "fp32" if tiny else "fp16"}
    if eva_weights is not None:
        vision["weights"] = str(eva_weights)
    return {"model": {
        "vision": vision,
        "bridges": [{"type": "qformer_tiny" if tiny else "qformer", "precision": qformer_precision},
                    {"type": "linear"}],
        "llm": {"type": "qwen", "preset": "qwen_tiny" if tiny else llm_preset, "precision": "fp32" if tiny else "bf16",
                "device_map": device, "gradient_checkpointing": grad_ckpt},
    }}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_times_ms(fn: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Per-call times in ms (CUDA events on GPU, perf_counter on CPU) after ``warmup`` calls."""
    import time

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def matmul_tflops(n: int = 8192) -> float:
    """Measured bf16 matmul rate (random data, median of 20 after warm-up)."""
    if not torch.cuda.is_available():
        n = 512
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = statistics.median(cuda_times_ms(lambda: a @ b, warmup=5, iters=20))
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def copy_gbps(nbytes: int = 2 << 30) -> float:
    """Measured device copy bandwidth, bytes read + written per second (GB/s)."""
    if not torch.cuda.is_available():
        nbytes = 64 << 20
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_times_ms(lambda: dst.copy_(src), warmup=3, iters=20))
    return 2 * nbytes / (ms / 1e3) / 1e9


def environment() -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_result(name: str, result: dict, tiny: bool) -> pathlib.Path:
    out_dir = ROOT / "bench" / "results"
    if tiny:  # CPU smoke runs never overwrite the committed GPU results
        out_dir = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "mllmkit_bench_tiny"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return path


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title} ==")
    for i, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
