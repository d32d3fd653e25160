"""Benchmark: `mllmkit run recipes/minigpt4qwen7b.toml` training throughput and MFU on one GPU.

    PYTHONPATH=.:plugins/vision_eva:plugins/bridge_qformer:plugins/llm_qwen python bench/train_throughput.py
    python bench/train_throughput.py --tiny        # the same runs at toy size on the CPU (smoke test)

What runs is ``mllmkit run`` itself (:func:`mllmkit.train.launch.run_command`, the function behind the
command, in this process): the 7B recipe with ``--set`` overrides only, on synthetic samples in the
seed's JSON format (``image``/``instruction``/``output``) with JPEG images on disk. Weights: EVA ViT-g
from a random checkpoint written here in LAVIS ``eva_vit_g.pth`` format (read by the plugin's loader);
the Q-Former and Qwen-7B randomly initialised from their presets (their ``weights``/``path`` keys
replaced by ``--set``; the full-size files are not written). Rows, each one run, same samples:

* seed-faithful: ``train.micro_batch_size=1 grad_accum=16``, ``data.pad_to_multiple=256`` (every
  sample padded to the seed's 256), LLM gradient checkpointing, ``train.loss_logits=all`` (head at
  every position, fp32 logits), random-crop augmentation;
* mllmkit: micro-batch 16, ``data.group_by_length``, ``data.pad_to_multiple=64``, no checkpointing,
  head at labelled tokens, ``data.augment=false``;
* mllmkit + ``train.cache_features``: the same, two epochs, the second (features cached) measured;
* mllmkit packed: ``data.packing`` (whole samples in one row of up to ``--batch`` × 256 tokens, no
  padding, positions restart per sample), micro-batch 1 row, otherwise as the mllmkit row;
* mllmkit packed + liger (CUDA only): the same with ``train.fused_kernels=liger`` (its error is
  recorded instead when liger-kernel cannot run);
* mllmkit packed + liger + flex (CUDA only): the same with the LLM's ``attn_implementation =
  "flex_attention"``: transformers builds a block-sparse document mask instead of SDPA's dense one.

samples/s come from each run's own ``metrics.jsonl`` (``log_every = 1``), over the steps after the
warm-up ones. Required FLOPs per sample: 4·N_llm_body·tokens + 4·N_head·labelled tokens + 3× the
trained Linear, + the frozen EVA + Q-Former forward (``FlopCounterMode``, per image; not counted for
the cached row), averaged over the data set's samples as the recipe's encoder tokenises them; MFU =
required FLOP/s over the bf16 matmul rate measured in this process.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import random
import sys
import tempfile
import time
from collections.abc import Callable

import tomllib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402
import torch  # noqa: E402

RECIPE = B.ROOT / "recipes" / "minigpt4qwen7b.toml"
WORDS = ("the a of to and in is it that for on with as was this by at be from or an are which image picture "
         "shows person man woman dog cat red blue green small large left right near far water tree sky car street "
         "describe what where how many colour holding standing sitting looking two three several").split()


def inline(table: dict) -> str:
    """A TOML inline table (strings, numbers, booleans, arrays, nested tables), for ``--set key={...}``."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return inline(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if isinstance(v, str) else str(v)
    return "{" + ", ".join(f"{k} = {value(v)}" for k, v in table.items()) + "}"


def write_data(folder: pathlib.Path, n: int, image_size: int, rng: random.Random) -> pathlib.Path:
    """``n`` records in the seed's format and their JPEGs; questions 4–30 words, answers 8–80 (about the seed's 60–250 text tokens)."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i in range(n):
        noise = torch.randint(0, 256, (image_size // 8, image_size // 8, 3), dtype=torch.uint8).numpy()
        Image.fromarray(noise).resize((image_size, image_size)).save(images / f"{i}.jpg", quality=90)
        words = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
        records.append({"image": f"{i}.jpg", "instruction": words(4, 30), "output": words(8, 80)})
    annotations = folder / "train.json"
    annotations.write_text(json.dumps(records))
    return annotations


def write_inputs(tmp: pathlib.Path, tiny: bool, samples: int,
                 rng: random.Random) -> tuple[pathlib.Path, pathlib.Path, dict]:
    """A random EVA checkpoint in LAVIS format and ``samples`` seed-format records with their JPEGs,
    under ``tmp``: ``(eva checkpoint, annotations, the [[data.train]] table naming them)``."""
    from mllmkit_vision_eva.encoder import EVA_TINY, EVA_VIT_G
    from mllmkit_vision_eva.random_checkpoint import write_random_checkpoint

    eva = write_random_checkpoint(tmp / "eva_vit_g.pth", EVA_TINY if tiny else EVA_VIT_G,
                                  dtype=torch.float32 if tiny else torch.float16, device="cpu" if tiny else "cuda")
    annotations = write_data(tmp / "data", samples, 64 if tiny else 256, rng)
    dataset = {"type": "minigpt4qwen_instruction", "annotations": str(annotations),
               "images": str(annotations.parent / "images")}
    return eva, annotations, dataset


def model_overrides(tiny: bool, eva: pathlib.Path, checkpointing: bool, recipe: pathlib.Path = RECIPE) -> list[str]:
    """The recipe's model with random weights: EVA from ``eva``, the Q-Former and Qwen from presets; a
    ``[model] init_from`` (an earlier run's export) is dropped by restating the model table without it."""
    model = tomllib.loads(recipe.read_text())["model"]
    qformer = {k: v for k, v in model["bridges"][0].items() if k != "weights"}
    llm = {k: v for k, v in model["llm"].items() if k != "path"}
    llm["gradient_checkpointing"] = checkpointing
    if tiny:
        qformer = {"type": "qformer_tiny"}
        llm.update(preset="qwen_tiny", precision="fp32")
    sets = [f"model.vision.weights={json.dumps(str(eva))}", f"model.bridges[0]={inline(qformer)}",
            f"model.llm={inline(llm)}"]
    if "init_from" in model:
        sets.insert(0, f"model={inline({k: v for k, v in model.items() if k != 'init_from'})}")
    if tiny:
        sets += ["model.vision.type=eva_tiny", "model.vision.precision=fp32"]
    return sets


def run_dir_for(folder: pathlib.Path, row: str) -> pathlib.Path:
    """A row's run folder under ``folder``, named after the row."""
    return folder / row.replace(" ", "_").replace("+", "").replace(",", "")


def run_row(name: str, overrides: list[str], run_dir: pathlib.Path, skip_steps: int,
            recipe: pathlib.Path = RECIPE) -> dict:
    """``mllmkit run`` of ``recipe`` with ``overrides``; samples/s over the steps after ``skip_steps`` from metrics.jsonl."""
    from mllmkit.train.launch import run_command

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_command(str(recipe), overrides, output_dir=str(run_dir))
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("samples_per_s") and r["step"] > skip_steps]
    step_seconds = [r["samples"] / r["samples_per_s"] for r in steps]  # each record is one step (packed: any size)
    seconds = sum(step_seconds)
    return {"row": name, "overrides": overrides, "measured_steps": len(steps), "run_wall_s": round(wall, 1),
            "samples_per_s": sum(r["samples"] for r in steps) / seconds if steps else float("nan"),
            "labelled_tokens_per_s": sum(r["tokens_per_s"] * t for r, t in zip(steps, step_seconds)) / seconds,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan"),
            "final_loss": steps[-1]["loss"] if steps else None}


def run_rows(planned: list[tuple[str, Callable[[], dict]]], wanted: str, errors: dict[str, str]) -> list[dict]:
    """Measure the rows named in ``wanted`` (separated by ";", as the names hold commas; empty: all) in order; a failing row is
    recorded in ``errors`` with its traceback and the others still run."""
    if wanted:
        names = {name.strip() for name in wanted.split(";")}
        planned = [row for row in planned if row[0] in names]
    rows = []
    for name, measure in planned:
        print(f"== {name}", flush=True)
        try:
            rows.append(measure())
            print(f"== {name}: {json.dumps(rows[-1])}", flush=True)
        except Exception as exc:
            import traceback

            errors[name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-4000:]}"
            print(f"{name} failed: {errors[name]}", flush=True)
    return rows


def flops_per_sample(overrides: list[str], annotations: pathlib.Path, recipe: pathlib.Path = RECIPE) -> dict:
    """Parameter counts (LoRA adapters apart from the LLM body), per-image vision and projector FLOPs and
    mean tokens per sample of the recipe's model and encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    import mllmkit
    from mllmkit.builtin.datasets import MiniGPT4QwenInstructions
    from mllmkit.data import SampleEncoder

    loaded = mllmkit.load_recipe(str(recipe), overrides)
    model = mllmkit.assemble(loaded)
    device = next(model.llm.parameters()).device
    model.to(device)
    hf = model.llm.hf_model
    layers = dict(hf.model.layers.named_parameters())
    n_lora = sum(p.numel() for n, p in layers.items() if "lora_" in n)
    n_body = sum(p.numel() for n, p in layers.items() if "lora_" not in n) + hf.model.norm.weight.numel()
    n_head = hf.lm_head.weight.numel()
    size = model.vision.image_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = model.image_features(torch.randn(1, 3, size, size, device=device))
    vision = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.features_to_embeds(features)
    linear = counter.get_total_flops()
    data = MiniGPT4QwenInstructions("bench", annotations, annotations.parent / "images")
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False),
                            loaded.train.max_text_len)
    encoded = [encoder.encode_text(data[i]) for i in range(len(data))]
    tokens = sum(len(e.input_ids) for e in encoded) / len(encoded)
    labelled = sum(sum(1 for x in e.labels[1:] if x != -100) for e in encoded) / len(encoded)
    model_tokens = model.tokens_per_image
    del model, hf
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    text = 4 * n_body * tokens + 4 * n_head * labelled + 3 * linear
    return {"llm_body_params": n_body, "llm_head_params": n_head, "llm_lora_params": n_lora,
            "vision_flops_per_image": vision, "projector_flops_per_image": linear,
            "tokens_per_image": model_tokens, "mean_tokens": tokens, "mean_labelled_tokens": labelled,
            "text_flops_per_sample": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    ap.add_argument("--samples", type=int, default=1024, help="samples in the synthetic data set")
    ap.add_argument("--seed-steps", type=int, default=4, help="optimizer steps (of 16 samples) of the seed row")
    ap.add_argument("--batch", type=int, default=16, help="mllmkit micro-batch (the step stays 16 samples when ≤ 16)")
    ap.add_argument("--workers", type=int, default=8, help="data.num_workers of every row")
    ap.add_argument("--rows", default="", help="row names to run, separated by ';' (default: all), e.g. 'seed-faithful;mllmkit'")
    args = ap.parse_args()
    if args.tiny:
        args.samples, args.seed_steps, args.batch, args.workers = 64, 3, 8, 0
    B.register_plugins()
    rng = random.Random(0)
    torch.manual_seed(0)
    result: dict = {**B.environment(), "tiny": args.tiny, "recipe": str(RECIPE.relative_to(B.ROOT))}
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        tmp = pathlib.Path(tmp)
        eva, annotations, dataset = write_inputs(tmp, args.tiny, args.samples, rng)
        common = [f"data.train=[{inline(dataset)}]",
                  f"data.num_workers={args.workers}", "parallel.type=single", "train.log_every=1",
                  "train.save_every=100000", "train.warmup_steps=0", "train.loss_reduction=token"]
        if args.tiny:
            common += ["train.precision=fp32", "train.device=cpu"]
        fast_model = model_overrides(args.tiny, eva, checkpointing=False)
        costs = flops_per_sample(common + fast_model, annotations)
        result["costs"] = costs
        matmul = B.matmul_tflops()
        result["bf16_matmul_tflops"] = round(matmul, 1)
        accum = max(16 // args.batch, 1)
        per_epoch = args.samples // (args.batch * accum)
        fast = common + fast_model + [f"train.micro_batch_size={args.batch}", f"train.grad_accum={accum}",
                                      "data.group_by_length=true", "data.pad_to_multiple=64", "data.augment=false"]
        packed = common + fast_model + ["train.micro_batch_size=1", "train.grad_accum=1", "data.packing=true",
                                        f"data.max_tokens_per_batch={args.batch * 256}", "data.augment=false",
                                        "train.epochs=1"]
        planned = [
            ("seed-faithful", common + model_overrides(args.tiny, eva, checkpointing=True) + [
                "train.micro_batch_size=1", "train.grad_accum=16", "data.pad_to_multiple=256",
                "train.loss_logits=all", f"train.max_steps={args.seed_steps}"], 1),
            ("mllmkit", fast + ["train.epochs=1"], 2),
            ("mllmkit + cache_features", fast + ["train.epochs=2", "train.cache_features=true"], per_epoch),
            ("mllmkit packed", packed, 2),
        ]
        if not args.tiny:
            planned.append(("mllmkit + liger", fast + ["train.epochs=1", "train.fused_kernels=liger"], 2))
            planned.append(("mllmkit packed + liger", packed + ["train.fused_kernels=liger"], 2))
            planned.append(("mllmkit packed + liger + flex", packed + ["train.fused_kernels=liger",
                                                                     "model.llm.attn_implementation=flex_attention"], 2))
        result["errors"] = {}
        rows = run_rows([(name, functools.partial(run_row, name, overrides, run_dir_for(tmp, name), skip))
                         for name, overrides, skip in planned], args.rows, result["errors"])
    base = rows[0]["samples_per_s"] if rows and rows[0]["row"] == "seed-faithful" else float("nan")
    table = []
    for row in rows:
        per_sample = costs["text_flops_per_sample"] + (0 if "cache" in row["row"] else costs["vision_flops_per_image"])
        row["mfu"] = row["samples_per_s"] * per_sample / (matmul * 1e12)
        row["vs_seed"] = row["samples_per_s"] / base
        table.append([row["row"], f"{row['samples_per_s']:.1f}", f"{row['labelled_tokens_per_s']:.0f}",
                      f"{row['peak_gb']:.1f}", f"{100 * row['mfu']:.1f}%", f"{row['vs_seed']:.2f}x",
                      row["measured_steps"]])
    result["rows"] = rows
    B.write_result("train_throughput_tiny" if args.tiny else "train_throughput", result, args.tiny)
    print(f"device {result['device']}, torch {result['torch']}, transformers {result['transformers']}; "
          f"bf16 matmul {matmul:.0f} TFLOP/s; {costs['mean_tokens']:.0f} tokens "
          f"({costs['mean_labelled_tokens']:.0f} labelled) per sample")
    B.print_table("mllmkit run, MiniGPT4Qwen-7B (LLM frozen, Linear trains)",
                  ["row", "samples/s", "labelled tok/s", "peak GB", "MFU", "vs seed", "steps"], table)


if __name__ == "__main__":
    main()
