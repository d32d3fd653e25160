"""MiniGPT4Qwen-14B on a 2-stage DeepSpeed pipeline vs the same model on one GPU (random weights).

    python bench/pipeline_14b.py --shapes 8x16 --checkpointing off,on   # 2 GPUs: both runs per shape × setting
    python bench/pipeline_14b.py --tiny          # CPU smoke test of the same code path (tiny parts, gloo)

The model is the 14B recipe's: eva_vit_g (fp16, frozen) → qformer (frozen) → linear (trained) →
qwen14b_chat preset (bf16, frozen), built with every parameter on the meta device; the pipeline
materialises only each rank's stage on its GPU (random init), the one-GPU run materialises all.
Both train a few optimizer steps on synthetic samples (one 224 px image + text, labels on the
answer part) with the same global batch, for each MICROxACCUM shape and each activation-checkpointing
setting (on: both recompute the LLM decoders in backward; off: neither does), and report step time,
samples/s and peak memory per stage; unless --no-profile, one more step per rank runs under torch.profiler (compute vs
NCCL kernel time; op tables in bench/results/logs/). Per-stage partition (cost model) is stored too. If the whole model does not fit
one GPU the single run reports the out-of-memory error instead.

The GPU box has no deepspeed/tomli installed: install wheels of them (``pip download`` on a
machine with network) into a folder on PYTHONPATH first. Plugins are registered
explicitly (no entry points needed).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
for extra in (ROOT, *(ROOT / "plugins" / p for p in ("vision_eva", "bridge_qformer", "llm_qwen", "parallel_pipeline"))):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
                   "TORCH_CUDA_ARCH_LIST": "9.0"}.items():
    os.environ.setdefault(key, value)


def register_plugins() -> None:
    import mllmkit_bridge_qformer.hooks as qformer
    import mllmkit_llm_qwen.hooks as qwen
    import mllmkit_parallel_pipeline.hooks as pipeline_hooks
    import mllmkit_vision_eva.hooks as eva

    import mllmkit.builtin.hooks as builtin
    from mllmkit.plugins import build_plugin_host, reset_plugin_host

    reset_plugin_host(build_plugin_host(entry_points=[], extra_plugins=[
        ("builtin", builtin), ("vision_eva", eva), ("bridge_qformer", qformer), ("llm_qwen", qwen),
        ("parallel_pipeline", pipeline_hooks)]))


def recipe_dict(tiny: bool, stages: int, parallel: str, micro: int, accum: int, checkpointing: bool) -> dict:
    device = "cpu" if tiny else "auto"
    return {
        "model": {
            "vision": {"type": "eva_tiny" if tiny else "eva_vit_g", "precision": "fp32" if tiny else "fp16"},
            "bridges": [{"type": "qformer_tiny" if tiny else "qformer"}, {"type": "linear"}],
            "llm": {"type": "qwen", "preset": "qwen_tiny" if tiny else "qwen14b_chat",
                    "precision": "fp32" if tiny else "bf16"},
        },
        "train": {"micro_batch_size": micro, "grad_accum": accum, "max_text_len": 224,
                  "precision": "fp32" if tiny else "bf16", "device": device, "lr": 1e-4, "warmup_steps": 1,
                  "betas": [0.9, 0.99], "eps": 1e-7, "grad_clip": 1.0, "seed": 42},
        "parallel": {"type": parallel, **({"num_stages": stages, "activation_checkpointing": checkpointing}
                                          if parallel == "pipeline" else {})},
    }


def synthetic_batches(model, n: int, micro: int, text_len: int, seed: int):
    """``n`` micro-batches of ``micro`` samples: [image tokens][text], labels on the last third."""
    import torch

    from mllmkit.data.collate import Batch
    from mllmkit.template import IGNORE_INDEX

    generator = torch.Generator().manual_seed(seed)
    template = model.llm.template
    image_id, q = template.image_token_id, model.tokens_per_image
    vocab = min(model.llm.tokenizer.vocab_size, 100_000)
    size = model.vision.image_size
    out = []
    for _ in range(n):
        text = torch.randint(100, vocab, (micro, text_len), generator=generator)
        text[text == image_id] = 100  # never a stray image placeholder
        ids = torch.cat([torch.full((micro, q), image_id), text], dim=1)
        labels = ids.clone()
        labels[:, : q + (2 * text_len) // 3] = IGNORE_INDEX
        out.append(Batch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids),
                         pixels=torch.randn(micro, 3, size, size, generator=generator)))
    return out


def profile_one_step(engine, batches, table: pathlib.Path) -> dict:
    """One more step under torch.profiler: this rank's GPU time in compute kernels vs NCCL kernels
    (which spin while they wait) against the step's wall time; the op tables go to ``table``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        engine.train_step(batches)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    nccl = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower()) / 1e6
    compute = sum(e.self_device_time_total for e in kernels) / 1e6 - nccl
    table.write_text(events.table(sort_by="self_cuda_time_total", row_limit=30) + "\n"
                     + events.table(sort_by="self_cpu_time_total", row_limit=30))
    return {"profiled_wall_s": wall, "gpu_compute_s": compute, "nccl_kernel_s": nccl}


def run_worker(mode: str, tiny: bool, steps: int, shape: str, checkpointing: bool, profiled: bool,
               out: pathlib.Path) -> None:
    import functools

    import torch

    from mllmkit.recipe import load_recipe
    from mllmkit.train.optim import build_adamw, make_lr_schedule

    register_plugins()
    micro, accum = (int(n) for n in shape.split("x"))
    recipe = load_recipe(recipe_dict(tiny, 2, "pipeline" if mode == "pipeline" else "single", micro, accum,
                                     checkpointing))
    settings = recipe.train
    cuda = torch.cuda.is_available() and not tiny
    result: dict = {"mode": mode, "shape": shape, "checkpointing": checkpointing}
    t0 = time.perf_counter()
    if mode == "pipeline":
        from mllmkit.train.loop import build_backend

        backend = build_backend(recipe)
        backend.setup()
        torch.manual_seed(settings.seed)
        model = backend.assemble(recipe)
        engine = backend.prepare(model, functools.partial(build_adamw, train=settings),
                                 make_lr_schedule(settings, 100), settings)
        result["plan"] = {"parts": engine.runner.plan.parts, "decoders_per_stage": engine.runner.plan.stage_decoder_layers(),
                          "params_per_stage": engine.runner.plan.stage_params(),
                          "flops_share": [f / sum(engine.runner.plan.stage_flops()) for f in engine.runner.plan.stage_flops()]}
    else:
        from mllmkit_parallel_pipeline.pipe_layers import (
            materialize_layers,
            pipeline_layers,
        )

        from mllmkit.assemble import assemble
        from mllmkit.builtin.backends import SingleBackend
        from mllmkit.weights import meta_parameters

        backend = SingleBackend("cpu" if tiny else "auto")
        backend.setup()
        torch.manual_seed(settings.seed)
        with meta_parameters():
            model = assemble(recipe)
        try:
            materialize_layers(pipeline_layers(model), backend.device, seed=settings.seed)
            model.llm.gradient_checkpointing(checkpointing)
            engine = backend.prepare(model, functools.partial(build_adamw, train=settings),
                                     make_lr_schedule(settings, 100), settings)
        except torch.OutOfMemoryError as exc:
            result["error"] = f"out of memory building the whole model on one GPU: {exc}"
            out.write_text(json.dumps(result, indent=2))
            return
    result["build_s"] = time.perf_counter() - t0
    # The same samples on every rank: a pipeline's first stage reads the inputs and its last the labels.
    batches = synthetic_batches(model, settings.grad_accum, settings.micro_batch_size, settings.max_text_len,
                                seed=1234)
    times, losses = [], []
    try:
        for i in range(steps + 1):  # the first step warms up (allocator, cuDNN plans)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            stats = engine.train_step(batches)
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
            losses.append(stats["loss"])
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory in a training step: {str(exc).splitlines()[0]}"
    step_s = statistics.median(times) if times else float("nan")
    profile = {}
    if cuda and times and profiled:
        logs = ROOT / "bench" / "results" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        rank = getattr(backend, "global_rank", 0)
        ckpt = "ckpt" if checkpointing else "nockpt"
        profile = profile_one_step(engine, batches, logs / f"pipeline_14b_{shape}_{ckpt}_{mode}_rank{rank}.txt")
        profile["busy_fraction"] = profile["gpu_compute_s"] / step_s
    global_batch = settings.micro_batch_size * settings.grad_accum * backend.world_size
    result.update({"steps_timed": len(times), "step_s": step_s, "step_times_s": times, "losses": losses,
                   "global_batch": global_batch, "samples_per_s": global_batch / step_s if times else None,
                   "tokens_per_sample": settings.max_text_len + model.tokens_per_image})
    memory = {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
              "local_params": sum(p.numel() for p in model.parameters() if not p.is_meta), **profile}
    if mode == "pipeline":
        per_rank = backend.all_gather_object({"rank": backend.global_rank, "stage": backend.stage, **memory})
        result["per_rank"] = per_rank
        if backend.is_main:
            out.write_text(json.dumps(result, indent=2, default=str))
        backend.shutdown()
        sys.stdout.flush()
        os._exit(0)  # DeepSpeed's teardown may abort after the work is done
    result["memory"] = memory
    out.write_text(json.dumps(result, indent=2, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny parts")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--checkpointing", default="off,on",
                        help="comma-separated on/off: recompute the LLM decoders in backward (both runs alike)")
    parser.add_argument("--shapes", default="8x16",
                        help="comma-separated MICROxACCUM: micro-batch size x micro-batches per step")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled step (slow to summarise with many micro-batches)")
    parser.add_argument("--worker", choices=["pipeline", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.tiny, args.steps, args.shapes, args.checkpointing == "on", not args.no_profile,
                   pathlib.Path(args.out))
        return 0

    import socket

    import torch

    work = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "mllmkit_pipeline_bench"
    work.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if args.tiny:
        env.setdefault("DS_ACCELERATOR", "cpu")
    flags = (["--tiny"] if args.tiny else []) + (["--no-profile"] if args.no_profile else [])
    shapes = ["2x2"] if args.tiny else args.shapes.split(",")
    comparisons = []
    for shape, setting in ((s, c) for s in shapes for c in args.checkpointing.split(",")):
        runs = {}
        for mode in ("pipeline", "single"):
            out = work / f"{mode}.json"
            out.unlink(missing_ok=True)
            if mode == "pipeline":
                command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), __file__, "--worker", mode, "--out", str(out)]
            else:
                command = [sys.executable, __file__, "--worker", mode, "--out", str(out)]
            start = time.perf_counter()
            code = subprocess.call(command + flags + ["--steps", str(args.steps), "--shapes", shape,
                                                      "--checkpointing", setting], env=env)
            runs[mode] = json.loads(out.read_text()) if out.is_file() else {"error": f"exit code {code}, no result"}
            runs[mode]["wall_s"] = time.perf_counter() - start
            print(f"{shape} checkpointing {setting} {mode}: {json.dumps({k: v for k, v in runs[mode].items() if k != 'step_times_s'}, default=str)}")
        pipe, single = runs["pipeline"], runs["single"]
        speedup = (pipe["samples_per_s"] / single["samples_per_s"]
                   if pipe.get("samples_per_s") and single.get("samples_per_s") else None)
        comparisons.append({"shape": shape, "checkpointing": setting, "pipeline_2_stages": pipe, "one_gpu": single,
                            "speedup_samples_per_s": speedup})
    import transformers

    result = {"bench": "pipeline_14b", "tiny": args.tiny, "comparisons": comparisons,
              "environment": {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                              "gpus": torch.cuda.device_count(), "torch": torch.__version__,
                              "transformers": transformers.__version__}}
    folder = ROOT / "bench" / "results" if not args.tiny else work
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline_14b.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    print(f"{'shape':>6} {'ckpt':>5} {'pipeline/s':>11} {'one GPU/s':>10} {'speedup':>8}")
    for c in comparisons:
        print(f"{c['shape']:>6} {c['checkpointing']:>5} {c['pipeline_2_stages'].get('samples_per_s') or float('nan'):11.2f} "
              f"{c['one_gpu'].get('samples_per_s') or float('nan'):10.2f} {c['speedup_samples_per_s'] or float('nan'):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
