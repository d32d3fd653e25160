"""Benchmark: MiniGPT4Qwen-7B chat latency, batch 1: time to first token and decode tokens/s.

    PYTHONPATH=.:plugins/vision_eva:plugins/bridge_qformer:plugins/llm_qwen python bench/decode_latency.py
    python bench/decode_latency.py --tiny          # CPU smoke test at toy size

Full-size parts through the real plugins (eva_vit_g fp16, qformer, linear, qwen7b_chat bf16, random
weights). The prompt is one image (32 image tokens) + a 100-token question in ChatML framing.
Time to first token = pixels and ids in → first new token id on the host (image encoding, embedding,
prefill, token choice). Decode rate = 255 / (time for 256 new tokens − time for 1). Compared:
plain transformers ``generate`` (dynamic cache), ``mllmkit.generation`` with unfused weights, and
``mllmkit.generation`` as chat runs it (q/k/v and gate/up fused, prompt bucketed; static cache + CUDA
graph; then also compiled), greedy and sampling; beside the bandwidth bound (LLM weight bytes read per
token / copy bandwidth measured in the same process). Batched decoding (``mllmkit.generation_batch``,
8 and 32 copies of the prompt, greedy): aggregate new tokens/s over the whole call and over the decode
steps alone. No stop tokens, so every run makes exactly the tokens asked for.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402
import torch  # noqa: E402

import mllmkit  # noqa: E402
from mllmkit.generation import _DECODERS, Decoder, decoder_for, generate  # noqa: E402
from mllmkit.generation_batch import BatchRow, generate_batch  # noqa: E402


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        B.sync()
        t0 = time.perf_counter()
        fn()
        B.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_kernels(decoder: Decoder, steps: int = 20, top: int = 25) -> list[dict]:
    """CUDA time per decode step by kernel (the step run outside its graph, so the profiler sees each
    kernel); prints the table."""
    from torch.profiler import ProfilerActivity, profile

    decoder.step(torch.zeros(1, dtype=torch.long, device=decoder.device), 200, 200)
    with torch.inference_mode():
        for _ in range(3):
            decoder._step_fn()
        B.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                decoder._step_fn()
            B.sync()
    events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / steps
    rows = [{"kernel": e.key[:120], "us_per_step": round(e.device_time_total / steps, 1),
             "calls_per_step": e.count // steps} for e in events[:top]]
    print(f"decode step kernels ({'compiled' if decoder.compiled else 'eager'}): {total:.0f} us of GPU time per step")
    for row in rows:
        print(f"  {row['us_per_step']:8.1f} us  x{row['calls_per_step']:<4} {row['kernel']}")
    return [{"kernel": "(all)", "us_per_step": round(total, 1), "calls_per_step": sum(e.count for e in events) // steps},
            *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true",
                    help="also: the CUDA kernels of one decode step (eager and compiled), from torch.profiler")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        args.new_tokens, args.reps = 16, 1
    B.register_plugins()
    torch.manual_seed(0)
    result: dict = {**B.environment(), "tiny": args.tiny, "new_tokens": args.new_tokens}
    t0 = time.perf_counter()
    model = mllmkit.assemble(mllmkit.load_recipe(B.recipe(args.tiny, device="cpu" if args.tiny else "cuda:0")))
    model.to(device).eval()
    B.sync()
    result["build_s"] = round(time.perf_counter() - t0, 2)
    llm, hf = model.llm, model.llm.hf_model
    tmpl = llm.template
    rng = random.Random(0)
    words = lambda n: [rng.randrange(tmpl.pad_token_id) for _ in range(n)]  # noqa: E731
    # <|im_start|>system\n…<|im_end|>\n<|im_start|>user\n <image> question <|im_end|>\n<|im_start|>assistant\n
    im_start, im_end = llm.tokenizer.token_id("<|im_start|>"), llm.tokenizer.token_id("<|im_end|>")
    ids = ([im_start] + words(8) + [im_end] + words(1) + [im_start] + words(2)
           + [tmpl.image_token_id] * model.tokens_per_image + words(100) + [im_end] + words(1) + [im_start] + words(2))
    input_ids = torch.tensor([ids], device=device)
    size = model.vision.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=next(model.vision.parameters()).dtype)
    result["prompt_tokens"] = len(ids)

    n_weights = sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    copy_bw = B.copy_gbps()
    bound = copy_bw * 1e9 / weight_bytes
    result.update(llm_weight_bytes_per_token=weight_bytes, copy_gbps=round(copy_bw, 1),
                  bound_tokens_per_s=round(bound, 1), llm_params_read_per_token=n_weights)

    def embeds():
        with torch.inference_mode():
            return model.embed(input_ids, pixels=pixels)

    def hf_run(n: int, do_sample: bool = False):
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=do_sample, top_p=0.8, top_k=0,
                               temperature=0.7, eos_token_id=None, bos_token_id=None, pad_token_id=tmpl.pad_token_id)
        with torch.inference_mode():
            out = hf.generate(inputs_embeds=embeds(), attention_mask=torch.ones_like(input_ids), generation_config=cfg)
        return out[0, -n:].tolist()

    def mk_run(n: int, do_sample: bool = False):
        kw = dict(do_sample=True, top_p=0.8, temperature=0.7) if do_sample else {}
        return generate(llm, embeds(), torch.ones_like(input_ids), max_new_tokens=n, **kw)

    unfused: list[Decoder] = []

    def unfused_run(n: int, do_sample: bool = False):
        if not unfused:  # built (and captured) once, before anything fuses the model's weights
            unfused.append(Decoder(llm, -(-(len(ids) + args.new_tokens) // 256) * 256, fuse=False))
        kw = dict(do_sample=True, top_p=0.8, temperature=0.7) if do_sample else {}
        return unfused[0].generate(embeds(), torch.ones_like(input_ids), max_new_tokens=n, **kw)

    rows = []
    measured = {}

    def build_fused():
        t0 = time.perf_counter()
        decoder_for(llm, len(ids) + args.new_tokens)
        B.sync()
        result["mllmkit_decoder_build_and_capture_s"] = round(time.perf_counter() - t0, 2)
        result["mllmkit_cache_len"] = _DECODERS[hf].max_cache_len
        result["mllmkit_fused_groups"] = _DECODERS[hf].fused_groups

    def compiled():
        t0 = time.perf_counter()
        decoder_for(llm, len(ids) + args.new_tokens, compile=True)
        B.sync()
        result["mllmkit_compiled_decoder_build_s"] = round(time.perf_counter() - t0, 2)

    unfused_tokens = None
    for name, run in (("HF generate", hf_run), ("mllmkit.generation unfused", unfused_run),
                      ("mllmkit.generation", mk_run), ("mllmkit.generation+compile", mk_run)):
        if name == "mllmkit.generation":
            unfused_tokens = unfused_run(64)
            unfused.clear()  # free its cache
            build_fused()
        if name.endswith("+compile"):
            try:
                compiled()
            except Exception as exc:  # record and go on: the eager-graph numbers stand
                result["compile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                print("compile failed:", result["compile_error"])
                break
        for sample in (False, True):
            run(2, sample)
            run(args.new_tokens, sample)  # warm-up
            ttft = median_s(lambda: run(1, sample), args.reps * 3)
            full = median_s(lambda: run(args.new_tokens, sample), args.reps)
            rate = (args.new_tokens - 1) / (full - ttft)
            key = f"{name} ({'sample' if sample else 'greedy'})"
            measured[key] = {"ttft_ms": round(ttft * 1e3, 2), "total_s": round(full, 4),
                             "decode_tokens_per_s": round(rate, 1), "fraction_of_bound": round(rate / bound, 3)}
            rows.append([key, f"{ttft * 1e3:.1f}", f"{rate:.1f}", f"{100 * rate / bound:.0f}%"])
    if args.profile and device.type == "cuda" and "compile_error" not in result:
        result["step_kernels"] = {"compiled": step_kernels(_DECODERS[hf])}
    decoder_for(llm, len(ids) + args.new_tokens, compile=False)
    if args.profile and device.type == "cuda":
        result.setdefault("step_kernels", {})["eager"] = step_kernels(_DECODERS[hf])
    hf_tokens, mk_tokens = hf_run(64), mk_run(64)
    same = next((i for i, (a, b) in enumerate(zip(hf_tokens, mk_tokens)) if a != b), len(hf_tokens))
    result["greedy_first_64_agree_for"] = same
    result["greedy_fused_equals_unfused_64"] = mk_tokens == unfused_tokens

    batched = {}
    for rows_n in (8, 32):
        def batch_run(n: int, rows_n: int = rows_n):
            prompt = embeds()[0]
            return generate_batch(llm, [BatchRow(prompt, max_new_tokens=n) for _ in range(rows_n)])

        batch_run(2)
        batch_run(args.new_tokens)  # warm-up (decoder build and capture for this row count)
        first = median_s(lambda: batch_run(1), args.reps)
        full = median_s(lambda: batch_run(args.new_tokens), args.reps)
        batched[rows_n] = {"aggregate_tokens_per_s": round(rows_n * args.new_tokens / full, 1),
                           "decode_tokens_per_s": round(rows_n * (args.new_tokens - 1) / (full - first), 1),
                           "first_token_ms": round(first * 1e3, 2), "total_s": round(full, 4)}
        rows.append([f"generation_batch x{rows_n} (greedy)", f"{first * 1e3:.1f}",
                     f"{batched[rows_n]['decode_tokens_per_s']:.1f} (all rows)", "-"])
    result["batched"] = batched
    for k in measured:
        base = measured[f"HF generate ({k.split('(')[1]}"]["decode_tokens_per_s"]
        measured[k]["decode_speedup_vs_hf"] = round(measured[k]["decode_tokens_per_s"] / base, 2)
        measured[k]["ttft_vs_hf"] = round(measured[k]["ttft_ms"] / measured[f"HF generate ({k.split('(')[1]}"]["ttft_ms"], 3)
    result["runs"] = measured
    result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None
    B.write_result("decode_latency_tiny" if args.tiny else "decode_latency", result, args.tiny)
    print(f"device {result['device']}, torch {result['torch']}, transformers {result['transformers']}; "
          f"prompt {len(ids)} tokens (1 image); copy {copy_bw:.0f} GB/s; LLM weights {weight_bytes / 1e9:.2f} GB/token; "
          f"bound {bound:.0f} tok/s; decoder capture {result['mllmkit_decoder_build_and_capture_s']} s; "
          f"greedy HF vs mllmkit identical for the first {same} of 64 tokens")
    B.print_table("chat latency, batch 1 (MiniGPT4Qwen-7B bf16)",
                  ["path", "TTFT ms", "decode tok/s", "of bound"], rows)


if __name__ == "__main__":
    main()
