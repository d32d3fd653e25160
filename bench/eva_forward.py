"""Benchmark: full-size EVA ViT-g (BLIP-2 variant, 39 blocks) forward throughput on one GPU.

Run from the repo root (the GPU box does not pip-install the plugins):

    PYTHONPATH=.:plugins/vision_eva python bench/eva_forward.py [--batch 64] [--iters 20]

Writes a random checkpoint in LAVIS ``eva_vit_g.pth`` format (40 blocks, fp16) to a temp folder,
builds ``eva_vit_g`` through the plugin's real loader (meta init + streaming, precision fp16),
times the forward at batch 64 with CUDA events (warm-up, median), and measures the bf16 matmul rate
in the same run for reference. Prints a table and writes ``bench/results/eva_forward.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "vision_eva"):  # same as PYTHONPATH=.:plugins/vision_eva
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from mllmkit_vision_eva.components import EvaViTGConfig, build_preset
from mllmkit_vision_eva.encoder import EVA_VIT_G
from mllmkit_vision_eva.random_checkpoint import write_random_checkpoint

from mllmkit.interfaces import BuildContext


def cuda_times_ms(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the load is measured apart from the file writing."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = statistics.median(cuda_times_ms(lambda: a @ b, warmup=5, iters=20))
    return 2 * n**3 / (ms / 1e3) / 1e12


def eva_flops_per_image(blocks: int, width: int = 1408, mlp: int = 6144, tokens: int = 257,
                        patch_in: int = 3 * 14 * 14) -> float:
    """Multiply-adds × 2 of one forward: patch embedding, qkv/proj/MLP linears, attention matmuls."""
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width
    return 2 * (tokens - 1) * patch_in * width + blocks * (linear + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench" / "results" / "eva_forward.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/eva_forward.py needs a CUDA GPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.backends.cuda.matmul.allow_tf32 = True

    with tempfile.TemporaryDirectory(prefix="eva_bench_") as tmp:
        path = pathlib.Path(tmp) / "eva_vit_g.pth"
        t0 = time.perf_counter()
        write_random_checkpoint(path, EVA_VIT_G, dtype=torch.float16, device="cuda")
        write_s = time.perf_counter() - t0
        file_gb = path.stat().st_size / 1e9
        reset_peak_rss()
        rss_before_gb = peak_rss_gib()
        t0 = time.perf_counter()
        encoder = build_preset(EVA_VIT_G, EvaViTGConfig(weights=path, precision="fp16"),
                               BuildContext(key="model.vision"))
        load_s = time.perf_counter() - t0
        peak_rss_gb = peak_rss_gib()
        t0 = time.perf_counter()
        encoder = encoder.cuda()
        to_gpu_s = time.perf_counter() - t0

    params = sum(p.numel() for p in encoder.parameters())
    pixels = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        out = encoder(pixels)
        assert out.shape == (args.batch, 257, 1408) and out.dtype == torch.float16, out.shape
        finite = bool(torch.isfinite(out).all())
        times = cuda_times_ms(lambda: encoder(pixels), warmup=args.warmup, iters=args.iters)
    median_ms = statistics.median(times)
    images_s = args.batch / (median_ms / 1e3)
    model_tflops = eva_flops_per_image(len(encoder.blocks())) * images_s / 1e12
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 1e9
    bf16_tflops = matmul_tflops()

    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "timm": __import__("timm").__version__, "python": platform.python_version(),
        "model": "eva_vit_g (39 blocks, 224px, fp16 weights, LayerNorm fp32)", "params": params,
        "batch": args.batch, "iters": args.iters, "warmup": args.warmup,
        "forward_ms_median": round(median_ms, 3), "forward_ms_min": round(min(times), 3),
        "forward_ms_max": round(max(times), 3), "images_per_s": round(images_s, 1),
        "model_tflops_per_s": round(model_tflops, 1), "bf16_matmul_tflops_per_s": round(bf16_tflops, 1),
        "output_finite": finite, "peak_gpu_mem_gb": round(peak_gpu_gb, 2),
        "checkpoint_write_s": round(write_s, 2), "checkpoint_gb": round(file_gb, 3),
        "load_s": round(load_s, 2), "rss_before_load_gib": round(rss_before_gb, 2),
        "load_peak_rss_gib": round(peak_rss_gb, 2), "to_gpu_s": round(to_gpu_s, 2),
    }
    rows = [("device", result["device"]), ("params", f"{params / 1e9:.3f} B"),
            (f"forward, batch {args.batch}, median", f"{median_ms:.2f} ms"),
            ("images/s", f"{images_s:.1f}"), ("model TFLOP/s (fp16)", f"{model_tflops:.1f}"),
            ("bf16 matmul TFLOP/s (8192^3)", f"{bf16_tflops:.1f}"),
            ("peak GPU memory", f"{peak_gpu_gb:.2f} GB"),
            ("checkpoint write / load / to GPU", f"{write_s:.1f} s / {load_s:.1f} s / {to_gpu_s:.1f} s"),
            ("peak RSS before / during load", f"{rss_before_gb:.2f} / {peak_rss_gb:.2f} GiB"), ("output finite", str(finite))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
