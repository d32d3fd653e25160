"""Benchmark: MiniGPT4Qwen-7B training throughput (LLM frozen, Linear trains) on one GPU.

    PYTHONPATH=.:plugins/vision_eva:plugins/bridge_qformer:plugins/llm_qwen python bench/train_throughput.py
    python bench/train_throughput.py --tiny        # CPU smoke test at toy size

Builds the full-size architecture through the real plugins (eva_vit_g fp16 from a random checkpoint
written in LAVIS eva_vit_g.pth format and read back by the plugin's loader; qformer; linear; qwen
preset qwen7b_chat bf16, random weights), then trains on synthetic instruction samples (one image =
32 image tokens + 60–250 text tokens, half of the text an answer with labels; total capped at the
seed's max_txt_len 256) in three configurations over the same samples:

* seed-faithful: micro-batch 1, every sample padded to 256, LLM gradient checkpointing, HF
  ``hf_model(inputs_embeds, attention_mask, labels)`` (full-vocabulary logits, HF loss);
* mllmkit best: ``MLLM.forward`` (head only at labelled positions), length-grouped micro-batches
  right-padded to a multiple of 64, no gradient checkpointing, causal SDPA on the flash backend;
* mllmkit best + cache_features: the same with the frozen EVA + Q-Former output computed once per
  image (``MLLM.image_features``) and only the Linear applied per step.

AdamW over the Linear only. Required FLOPs: 4·N_llm·tokens (frozen forward + input-gradient
backward; the head counted at labelled positions only) + the vision/Q-Former forward (counted per
image with torch's FlopCounterMode); MFU = required FLOP/s over the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pathlib
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import mllmkit  # noqa: E402
from mllmkit.template import IGNORE_INDEX  # noqa: E402

SEED_MAX_LEN = 256


def make_samples(n: int, image_token: int, vocab_hi: int, image_tokens: int, rng: random.Random):
    """``(ids, labels)`` lists: 4 prompt tokens, the image placeholders, a question, an answer."""
    samples = []
    for _ in range(n):
        text = rng.randint(60, 250)
        text = min(text, SEED_MAX_LEN - image_tokens)
        answer = text // 2
        question = text - answer - 4
        head = [rng.randrange(vocab_hi) for _ in range(4)]
        q = [rng.randrange(vocab_hi) for _ in range(question)]
        a = [rng.randrange(vocab_hi) for _ in range(answer)]
        ids = head + [image_token] * image_tokens + q + a
        labels = [IGNORE_INDEX] * (len(ids) - answer) + a
        samples.append((ids, labels))
    return samples


def pad_batch(samples, length: int, pad_id: int, device):
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    for i, (s_ids, s_labels) in enumerate(samples):
        ids[i, :len(s_ids)] = torch.tensor(s_ids)
        labels[i, :len(s_labels)] = torch.tensor(s_labels)
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def length_grouped(indices: list[int], samples, batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffled megabatches of 8 micro-batches, sorted by length inside (as a length-grouped sampler)."""
    idx = list(indices)
    rng.shuffle(idx)
    out = []
    for m in range(0, len(idx), 8 * batch):
        mega = sorted(idx[m:m + 8 * batch], key=lambda i: -len(samples[i][0]))
        out += [mega[j:j + batch] for j in range(0, len(mega), batch)]
    return out


def run_timed(step, items, warmup_items, device) -> dict:
    """Warm up on ``warmup_items``, then time every item (events per step, total over the run)."""
    for it in warmup_items:
        step(it)
    B.sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in items]
        t0 = time.perf_counter()
        for (s, e), it in zip(events, items):
            s.record()
            step(it)
            e.record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        times = [s.elapsed_time(e) for s, e in events]
        peak = torch.cuda.max_memory_allocated() / 1e9
    else:
        times = []
        t0 = time.perf_counter()
        for it in items:
            t = time.perf_counter()
            step(it)
            times.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
        peak = float("nan")
    return {"wall_s": wall, "step_ms_median": statistics.median(times), "steps": len(items), "peak_gb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    ap.add_argument("--samples", type=int, default=512, help="samples for the mllmkit configurations")
    ap.add_argument("--seed-samples", type=int, default=48, help="samples for the seed-faithful configuration")
    ap.add_argument("--batch", type=int, default=16, help="mllmkit micro-batch (halved on out-of-memory)")
    ap.add_argument("--profile", action="store_true", default=True)
    args = ap.parse_args()
    if args.tiny:
        args.samples, args.seed_samples, args.batch = 24, 4, 4
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    B.register_plugins()
    rng = random.Random(0)
    torch.manual_seed(0)

    from mllmkit_vision_eva.encoder import EVA_TINY, EVA_VIT_G
    from mllmkit_vision_eva.random_checkpoint import write_random_checkpoint

    result: dict = {**B.environment(), "tiny": args.tiny}
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        eva_path = pathlib.Path(tmp) / "eva_vit_g.pth"
        t0 = time.perf_counter()
        write_random_checkpoint(eva_path, EVA_TINY if args.tiny else EVA_VIT_G,
                                dtype=torch.float32 if args.tiny else torch.float16,
                                device="cpu" if args.tiny else "cuda")
        result["eva_checkpoint_write_s"] = round(time.perf_counter() - t0, 2)
        result["eva_checkpoint_gb"] = round(eva_path.stat().st_size / 1e9, 3)
        t0 = time.perf_counter()
        recipe = B.recipe(args.tiny, eva_weights=eva_path, device=str(device) if not args.tiny else "cpu")
        model = mllmkit.assemble(mllmkit.load_recipe(recipe))
        result["assemble_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    model.to(device)
    B.sync()
    result["to_device_s"] = round(time.perf_counter() - t0, 2)
    model.train()

    llm = model.llm
    hf = llm.hf_model
    n_body = sum(p.numel() for p in hf.model.layers.parameters()) + sum(p.numel() for p in hf.model.norm.parameters())
    n_head = hf.lm_head.weight.numel()
    n_vision = sum(p.numel() for p in model.vision.parameters())
    n_bridges = [sum(p.numel() for p in b.parameters()) for b in model.bridges]
    result["params"] = {"llm_body": n_body, "llm_head": n_head, "vision": n_vision, "bridges": n_bridges}
    size = model.vision.image_size
    T_img = model.tokens_per_image

    # FLOPs of one image through the frozen vision + Q-Former (+ linear), counted by torch.
    from torch.utils.flop_counter import FlopCounterMode

    probe = torch.randn(1, 3, size, size, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        feats = model.image_features(probe)
    vision_flops = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.features_to_embeds(feats)
    linear_fwd_flops = fc.get_total_flops()

    samples = make_samples(args.samples, llm.template.image_token_id, llm.template.pad_token_id, T_img, rng)
    pad_id = llm.template.pad_token_id
    vision_dtype = next(model.vision.parameters()).dtype
    pixels = torch.randn(args.samples, 3, size, size, device=device, dtype=vision_dtype)

    def required_flops(idx: list[int], with_vision: bool) -> float:
        tokens = sum(len(samples[i][0]) for i in idx)
        labelled = sum(sum(1 for x in samples[i][1][1:] if x != IGNORE_INDEX) for i in idx)
        flops = 4 * n_body * tokens + 4 * n_head * labelled + 3 * linear_fwd_flops * len(idx)
        return flops + (vision_flops * len(idx) if with_vision else 0)

    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def opt_step():
        opt.step()
        opt.zero_grad(set_to_none=True)

    matmul = B.matmul_tflops()
    result["bf16_matmul_tflops"] = round(matmul, 1)
    configs: dict[str, dict] = {}

    # -- seed-faithful --
    llm.gradient_checkpointing(True)
    hf.train()  # the seed's LAVIS model was in train mode
    seed_idx = list(range(args.seed_samples))

    def seed_step(i: int) -> None:
        ids, labels = pad_batch([samples[i]], SEED_MAX_LEN, pad_id, device)
        mask = (ids != pad_id).long()
        embeds = model.embed(ids, pixels=pixels[i:i + 1])
        out = hf(inputs_embeds=embeds, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt_step()

    r = run_timed(seed_step, seed_idx, [seed_idx[0], seed_idx[1]], device)
    r.update(samples=len(seed_idx), micro_batch=1, required_flops=required_flops(seed_idx, True))
    configs["seed-faithful"] = r
    llm.gradient_checkpointing(False)
    hf.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -- mllmkit best (+ cache_features) --
    attn = (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if device.type == "cuda" else contextlib.nullcontext
    cached = None

    def best_step(batch_idx: list[int]) -> None:
        chosen = [samples[i] for i in batch_idx]
        length = math.ceil(max(len(s[0]) for s in chosen) / 64) * 64
        ids, labels = pad_batch(chosen, length, pad_id, device)
        index = torch.tensor(batch_idx, device=device)
        if cached is not None:
            image_embeds = model.features_to_embeds(cached[index])
        else:
            image_embeds = model.encode_images(pixels[index])
        with attn():  # the LLM only: right padding + causal needs no mask, so SDPA can take flash
            out = model(ids, labels, image_embeds=image_embeds)
        (out.loss_sum / out.num_tokens.clamp(min=1)).backward()
        opt_step()

    def run_best(name: str, batch: int) -> int:
        while True:
            batches = length_grouped(range(args.samples), samples, batch, random.Random(1))
            by_len: dict[int, list[int]] = {}
            for b in batches:
                by_len.setdefault(math.ceil(max(len(samples[i][0]) for i in b) / 64) * 64, b)
            try:
                r = run_timed(best_step, batches, list(by_len.values()), device)
            except torch.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                if batch == 1:
                    raise
                print(f"{name}: out of memory at micro-batch {batch}; trying {batch // 2}")
                batch //= 2
                continue
            idx = [i for b in batches for i in b]
            r.update(samples=len(idx), micro_batch=batch, required_flops=required_flops(idx, cached is None),
                     padded_lengths=sorted(by_len))
            configs[name] = r
            return batch

    batch = run_best("mllmkit best", args.batch)
    t0 = time.perf_counter()
    with torch.no_grad():
        cached = torch.cat([model.image_features(pixels[i:i + 64]) for i in range(0, args.samples, 64)])
    B.sync()
    cache_s = time.perf_counter() - t0
    run_best("mllmkit best + cache_features", batch)
    configs["mllmkit best + cache_features"]["feature_cache_s"] = round(cache_s, 3)
    configs["mllmkit best + cache_features"]["feature_cache_images_per_s"] = round(args.samples / cache_s, 1)

    profile_text = None
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        cached = None
        batches = length_grouped(range(args.samples), samples, batch, random.Random(2))[:3]
        best_step(batches[0])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for b in batches[1:]:
                best_step(b)
            torch.cuda.synchronize()
        profile_text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        result["profile_best_2_steps"] = {"table": profile_text}  # totals: the table's footer

    rows = []
    base = configs["seed-faithful"]
    base_sps = base["samples"] / base["wall_s"]
    for name, r in configs.items():
        sps = r["samples"] / r["wall_s"]
        tokens = sum(len(samples[i][0]) for i in range(r["samples"])) if name == "seed-faithful" else \
            sum(len(s[0]) for s in samples)
        r["samples_per_s"] = round(sps, 2)
        r["tokens_per_s"] = round(tokens / r["wall_s"], 1)
        r["achieved_tflops"] = round(r["required_flops"] / r["wall_s"] / 1e12, 1)
        r["mfu"] = round(r["required_flops"] / r["wall_s"] / (matmul * 1e12), 4)
        r["speedup_vs_seed"] = round(sps / base_sps, 2)
        rows.append([name, r["micro_batch"], f"{sps:.1f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['step_ms_median']:.1f}", f"{r['peak_gb']:.1f}", f"{100 * r['mfu']:.1f}%",
                     f"{r['speedup_vs_seed']:.2f}x"])
    result["configs"] = configs
    if profile_text:
        print(profile_text)
    B.write_result("train_throughput_tiny" if args.tiny else "train_throughput", result, args.tiny)
    print(f"device {result['device']}, torch {result['torch']}, transformers {result['transformers']}; "
          f"bf16 matmul {matmul:.0f} TFLOP/s; eva_vit_g.pth write {result['eva_checkpoint_write_s']} s, "
          f"assemble (eva load + qformer + qwen7b init) {result['assemble_s']} s")
    B.print_table("training throughput (MiniGPT4Qwen-7B, LLM frozen)",
                  ["config", "mb", "samples/s", "tokens/s", "step ms (med)", "peak GB", "MFU", "vs seed"], rows)


if __name__ == "__main__":
    main()
