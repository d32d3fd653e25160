"""Benchmark: ``mllmkit export --verify`` of MiniGPT4Qwen-7B, the folder loaded by transformers on the GPU.

    python bench/export_parity.py            # GPU: 7B shape, random weights, exported in bf16, verified on CUDA
    python bench/export_parity.py --tiny     # CPU smoke test at toy size (fp32, the 1e-4 logits limit applies)

The export is :func:`mllmkit.export.write.export_model` (what ``mllmkit export RECIPE --to DIR --verify
--verify-device cuda --dtype bf16`` runs) of the benchmark recipe (EVA ViT-g, Q-Former, Linear,
Qwen-7B-Chat, random weights, built on the CPU as the command does). The verify step loads the folder
with ``Blip2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor`` and compares, in bf16 on the
GPU: prompt ids, the tokenizer on its multilingual corpus, pixels, logits (max abs, reported) and 32
greedy tokens (:mod:`mllmkit.export.verify`). Times: build + write, verify; sizes of the folder.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402

from mllmkit.export.write import export_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy-size parts, fp32, verified on the CPU")
    ap.add_argument("--dir", help="where to write the export (default: a temporary folder, removed afterwards)")
    args = ap.parse_args()
    B.register_plugins()
    dtype, device = ("fp32", "cpu") if args.tiny else ("bf16", "cuda")
    result: dict = {**B.environment(), "tiny": args.tiny, "dtype": dtype, "verify_device": device}
    with tempfile.TemporaryDirectory(prefix="export_bench_", dir=args.dir) as tmp:
        out = pathlib.Path(tmp) / "export"
        t0 = time.perf_counter()
        exported = export_model(B.recipe(args.tiny, device="cpu"), None, out, dtype=dtype, verify=True,
                                verify_device=device)
        result["export_and_verify_s"] = round(time.perf_counter() - t0, 1)
        result["target"] = exported["target"]
        result["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        result["folder_gb"] = round(sum(result["files"].values()) / 1e9, 2)
        result["verify"] = exported["verify"].figures()
        print(exported["verify"].describe())
    B.write_result("export_parity_tiny" if args.tiny else "export_parity", result, args.tiny)
    print(f"{result['target']}: {result['folder_gb']} GB, export + verify {result['export_and_verify_s']} s, "
          f"parity {'passed' if result['verify']['passed'] else 'FAILED'} ({dtype} on {device})")


if __name__ == "__main__":
    main()
