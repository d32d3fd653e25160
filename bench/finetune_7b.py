"""Benchmark: fine-tuning the 7B LLM on one GPU — LoRA vs plain transformers + peft, QLoRA, full fine-tunes.

    PYTHONPATH=.:plugins/vision_eva:plugins/bridge_qformer:plugins/llm_qwen python bench/finetune_7b.py
    python bench/finetune_7b.py --tiny        # the same rows at toy size on the CPU (smoke test)

The mllmkit rows are ``mllmkit run`` itself (:func:`mllmkit.train.launch.run_command`, in this process)
of ``recipes/minigpt4qwen7b_lora.toml`` (LoRA rows) and ``recipes/mppqwen7b_sft.toml`` (full rows) with
``--set`` overrides only, on the synthetic seed-format samples of ``bench/train_throughput.py`` (its
helpers: JPEGs on disk, EVA ViT-g from a random LAVIS-format checkpoint, the Q-Former and Qwen-7B-Chat
randomly initialised from their presets). ``[model] init_from`` (stage 1's export, which does not exist
here) is dropped. Every row: micro-batch ``--batch`` (16), grad_accum making 16-sample steps,
``data.group_by_length``, ``data.pad_to_multiple=64``, ``data.augment=false``, one epoch, warm-up
steps 0, token-mean loss; samples/s from the run's own ``metrics.jsonl`` over the steps after the first 2.
Rows:

1. peft baseline: plain transformers + peft, no mllmkit step. The same ``Qwen2ForCausalLM`` (built by the
   qwen plugin's preset, the same random init), ``peft.get_peft_model`` with the LoRA recipe's
   ``[model.llm.lora]`` (r 64, alpha 16, dropout 0.05, all-linear), the same gradient checkpointing
   (transformers' ``gradient_checkpointing_enable``, non-reentrant), bf16 autocast, fused AdamW
   (lr 2e-4), grad-norm clip 1.0. Text-only: no EVA or Q-Former runs; each image's 32 placeholder positions
   get fixed random embeddings (``inputs_embeds``). Its micro-batches are those of the LoRA row's epoch
   (the same draws, grouped by the encoded token length, padded to a multiple of 64, ``attention_mask``
   and ``labels`` passed as a plain transformers user does: logits at every position), already on the
   GPU. Timed with wall-clock over the steps after the first 2 (synchronised). It does less work than
   the mllmkit LoRA row (no vision tower, no projector, no data loading), so the ratio is conservative.
2. peft baseline, no checkpointing: the same without gradient checkpointing.
3. mllmkit lora: the LoRA recipe (``tune = "lora"`` r 64 all-linear on the LLM, the Linear projector
   trains), ``parallel.type = "single"``, gradient checkpointing as the recipe.
4. mllmkit lora, no checkpointing: the same with ``model.llm.gradient_checkpointing = false``.
5. mllmkit lora + liger packed (CUDA only), with and without checkpointing: the kit's fast path on the
   same data: ``data.packing`` (whole samples in rows of up to 16 × 256 tokens, one row per step, so a
   step is about the same 16 samples), ``train.fused_kernels = "liger"``.
6. mllmkit qlora nf4 (CUDA only): row 3 with ``model.llm.quantize = "nf4"`` (bitsandbytes).
7. mllmkit lora, fsdp 1 process / zero3 1 process: row 3 under ``parallel.type = "fsdp"`` (FSDP2 over the
   adapted LLM, fp32 masters, bf16 compute) and ``"zero"`` stage 3 (DeepSpeed), one process, so the
   sharded code paths run on CUDA.
8. mllmkit full, single, checkpointing: ``tune = "full"`` on the LLM (the SFT recipe), one process,
   every decoder layer recomputed in backward; and the same + liger packed (CUDA only).

"vs peft" compares a LoRA row with the peft baseline of the same checkpointing setting.

A full fine-tune under ``fsdp``/``zero`` stage 3 keeps fp32 masters, gradients and AdamW moments on the
GPU, 16 bytes per parameter = 123 GB for the 7.7B LLM before activations: more than one H200 holds in
one process (both ran out of memory in the first backward or optimizer step); that is the 2-GPU
measurement (the multi-GPU issue). ``single`` trains the bf16 weights in place (AdamW moments in bf16).

The run's final checkpoint and export are not written (``Engine.state_dict`` returns the step only;
``save_checkpoint``, ``export`` and ``write_adapters`` do nothing): a full fine-tune's state is about
90 GB (fp32 weights + AdamW moments) that would take minutes to gather and more disk than the GPU box
has. The timed steps are untouched.

MFU = required FLOP/s over the bf16 matmul rate measured in this process; per sample, with T its tokens
(text + 32 image positions, unpadded), L its labelled tokens, N_body the LLM's decoder parameters (+ final
norm), N_head the output head's, N_lora the adapters' (``costs`` in the JSON; attention's own FLOPs are
not counted, recompute is not counted):

* full rows: ``6·N_body·T + 6·N_head·L`` (forward 2N, backward 4N for a trained weight; the head runs
  at labelled tokens only) + the frozen EVA + Q-Former forward per image + 3× the trained projector;
* LoRA rows: ``4·N_body·T + 4·N_head·L + 6·N_lora·T`` (a frozen weight costs its forward 2N and the
  input-gradient half of backward 2N, which lower layers' adapters need) + the same vision terms;
* peft baseline: the LoRA LLM terms only (no images run). QLoRA's FLOPs are counted as LoRA's.

"vs peft" is a LoRA row's samples/s over the peft baseline's (QLoRA's too: against the same bf16 baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pathlib
import random
import sys
import tempfile
import time
from unittest import mock

import tomllib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402
import torch  # noqa: E402
from train_throughput import (  # noqa: E402
    flops_per_sample,
    inline,
    model_overrides,
    run_dir_for,
    run_row,
    run_rows,
    write_inputs,
)

LORA_RECIPE = B.ROOT / "recipes" / "minigpt4qwen7b_lora.toml"
SFT_RECIPE = B.ROOT / "recipes" / "mppqwen7b_sft.toml"
SKIP_STEPS = 2


@contextlib.contextmanager
def nothing_saved():
    """``mllmkit run`` without its final checkpoint and export (see the module docstring), and with the
    process environment restored afterwards (a one-process ``fsdp``/``zero`` run sets RANK, LOCAL_RANK, ...)."""
    import mllmkit.train.loop as loop
    from mllmkit.train.engine import Engine

    with mock.patch.dict(os.environ), \
            mock.patch.object(Engine, "state_dict", lambda self: {"model": {}, "step": self.step}), \
            mock.patch.object(loop, "save_checkpoint", lambda *args, **kwargs: None), \
            mock.patch.object(loop, "export", lambda *args, **kwargs: None), \
            mock.patch.object(loop, "write_adapters", lambda *args, **kwargs: None):
        yield


def mllmkit_row(name: str, overrides: list[str], folder: pathlib.Path, recipe: pathlib.Path) -> dict:
    with nothing_saved():
        return run_row(name, overrides, run_dir_for(folder, name), SKIP_STEPS, recipe=recipe)


def baseline_batches(overrides: list[str], annotations: pathlib.Path, template, tokens_per_image: int,
                     micro_batch: int) -> list:
    """The LoRA row's epoch of micro-batches, text only: the same draws grouped by encoded length, padded to 64."""
    import mllmkit
    from mllmkit.builtin.datasets import MiniGPT4QwenInstructions
    from mllmkit.data import epoch_order, group_by_length
    from mllmkit.data.collate import Collator, EncodedSample, SampleEncoder
    from mllmkit.data.sampling import epoch_micro_batches

    settings = mllmkit.load_recipe(str(LORA_RECIPE), overrides).train
    data = MiniGPT4QwenInstructions("bench", annotations, annotations.parent / "images")
    encoder = SampleEncoder(template, tokens_per_image, lambda image: image, settings.max_text_len)
    encoded = [encoder.encode_text(data[i]) for i in range(len(data))]
    order = epoch_order([len(data)], [1.0], settings.seed, 0)
    order = group_by_length(order, [len(encoded[i].input_ids) for _, i, _ in order], micro_batch)
    collate = Collator(template.pad_token_id, pad_to_multiple=64)
    return [collate([EncodedSample(encoded[i].input_ids, encoded[i].labels, []) for _, i, _ in draws])
            for draws in epoch_micro_batches(order, micro_batch)]


def peft_baseline(overrides: list[str], annotations: pathlib.Path, costs: dict, micro_batch: int, accum: int, *,
                  checkpointing: bool, tiny: bool) -> dict:
    """Row 1: plain transformers + peft on the same LLM and micro-batches (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    import mllmkit
    from mllmkit.interfaces import BuildContext

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    recipe = mllmkit.load_recipe(str(LORA_RECIPE), overrides)
    device = torch.device("cpu" if tiny else "cuda")
    torch.manual_seed(recipe.train.seed)
    llm = recipe.llm.spec.build(recipe.llm.config, BuildContext(
        key=recipe.llm.key, dtype=torch.float32 if tiny else torch.bfloat16, device=device))
    template, hf = llm.template, llm.hf_model
    lora = tomllib.loads(LORA_RECIPE.read_text())["model"]["llm"]["lora"]
    targets = lora["targets"]
    model = get_peft_model(hf, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                          target_modules="all-linear" if targets == ["all-linear"] else targets,
                                          bias=lora.get("bias", "none"), task_type="CAUSAL_LM"))
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr, fused=True)
    embed = model.get_input_embeddings()
    image_id = template.image_token_id
    pool = torch.randn(micro_batch * costs["tokens_per_image"], embed.embedding_dim, device=device,
                       dtype=embed.weight.dtype) * 0.02
    batches = [(b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device),
                int((b.input_ids == image_id).sum()), int((b.labels[:, 1:] != -100).sum()))
               for b in baseline_batches(overrides, annotations, template, costs["tokens_per_image"], micro_batch)]
    steps = [batches[i:i + accum] for i in range(0, len(batches) // accum * accum, accum)]
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=not tiny)

    def step(group) -> float:
        total = 0.0
        for ids, mask, labels, images, _ in group:
            embeds = embed(ids).masked_scatter((ids == image_id).unsqueeze(-1), pool[:images])
            with autocast():
                loss = model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss / len(group)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    for group in steps[:SKIP_STEPS]:
        step(group)
    B.sync()
    start = time.perf_counter()
    losses = [step(group) for group in steps[SKIP_STEPS:]]
    seconds = time.perf_counter() - start
    timed = [b for group in steps[SKIP_STEPS:] for b in group]
    name = "peft baseline" if checkpointing else "peft baseline, no checkpointing"
    return {"row": name, "measured_steps": len(losses), "run_wall_s": round(time.perf_counter() - t0, 1),
            "samples_per_s": sum(b[0].shape[0] for b in timed) / seconds if losses else float("nan"),
            "labelled_tokens_per_s": sum(b[4] for b in timed) / seconds if losses else float("nan"),
            "padded_tokens_per_sample": sum(b[0].numel() for b in timed) / max(sum(b[0].shape[0] for b in timed), 1),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan"),
            "final_loss": losses[-1] if losses else None, "trainable_params": sum(p.numel() for p in params)}


def required_flops(row: str, costs: dict) -> float:
    """Required FLOPs per sample of ``row`` (the formulas of the module docstring)."""
    tokens, labelled = costs["mean_tokens"], costs["mean_labelled_tokens"]
    dense = costs["llm_body_params"] * tokens + costs["llm_head_params"] * labelled
    if "full" in row:
        llm = 6 * dense
    else:
        llm = 4 * dense + 6 * costs["llm_lora_params"] * tokens
    if row.startswith("peft baseline"):
        return llm
    return llm + costs["vision_flops_per_image"] + 3 * costs["projector_flops_per_image"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (smoke test)")
    ap.add_argument("--samples", type=int, default=256, help="samples in the synthetic data set (one epoch per row)")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch of every row (the step stays 16 samples when ≤ 16)")
    ap.add_argument("--workers", type=int, default=8, help="data.num_workers of the mllmkit rows")
    ap.add_argument("--rows", default="", help="row names to run, separated by ';' (default: all), e.g. "
                                               "'peft baseline;mllmkit lora'")
    args = ap.parse_args()
    if args.tiny:  # one CPU thread: toy matrices gain nothing from more, and on a busy machine they spin
        args.samples, args.batch, args.workers = 48, 8, 0
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    B.register_plugins()
    rng = random.Random(0)
    torch.manual_seed(0)
    result: dict = {**B.environment(), "tiny": args.tiny, "recipes": [str(LORA_RECIPE.relative_to(B.ROOT)),
                                                                      str(SFT_RECIPE.relative_to(B.ROOT))]}
    with tempfile.TemporaryDirectory(prefix="finetune_bench_") as tmp:
        tmp = pathlib.Path(tmp)
        eva, annotations, dataset = write_inputs(tmp, args.tiny, args.samples, rng)
        accum = max(16 // args.batch, 1)
        common = [f"data.train=[{inline(dataset)}]", f"data.num_workers={args.workers}", "train.log_every=1",
                  "train.save_every=100000", "train.warmup_steps=0", "train.loss_reduction=token", "train.epochs=1",
                  f"train.micro_batch_size={args.batch}", f"train.grad_accum={accum}", "data.group_by_length=true",
                  "data.pad_to_multiple=64", "data.augment=false"]
        if args.tiny:
            common += ["train.precision=fp32", "train.device=cpu"]
        lora = common + ["parallel.type=single"] + model_overrides(args.tiny, eva, True, recipe=LORA_RECIPE)
        lora_no_ckpt = common + ["parallel.type=single"] + model_overrides(args.tiny, eva, False, recipe=LORA_RECIPE)
        fast = ["train.micro_batch_size=1", "train.grad_accum=1", "data.packing=true",
                f"data.max_tokens_per_batch={16 * 256}", "train.fused_kernels=liger"]
        full = common + model_overrides(args.tiny, eva, checkpointing=True, recipe=SFT_RECIPE)
        costs = flops_per_sample(lora, annotations, recipe=LORA_RECIPE)
        costs.pop("text_flops_per_sample")  # train_throughput's frozen-LLM formula; here: required_flops
        result["costs"] = costs
        matmul = B.matmul_tflops()
        result["bf16_matmul_tflops"] = round(matmul, 1)
        baseline = functools.partial(peft_baseline, lora, annotations, costs, args.batch, accum, tiny=args.tiny)
        planned = [("peft baseline", functools.partial(baseline, checkpointing=True)),
                   ("peft baseline, no checkpointing", functools.partial(baseline, checkpointing=False))]

        def row(name: str, overrides: list[str], recipe: pathlib.Path = LORA_RECIPE) -> None:
            planned.append((name, functools.partial(mllmkit_row, name, overrides, tmp, recipe)))

        row("mllmkit lora", lora)
        row("mllmkit lora, no checkpointing", lora_no_ckpt)
        if not args.tiny:  # liger and bitsandbytes are CUDA only
            row("mllmkit lora + liger packed", lora + fast)
            row("mllmkit lora + liger packed, no checkpointing", lora_no_ckpt + fast)
            row("mllmkit qlora nf4", lora + ["model.llm.quantize=nf4"])
        row("mllmkit lora, fsdp 1 process", [o for o in lora if o != "parallel.type=single"] + ["parallel.type=fsdp"])
        row("mllmkit lora, zero3 1 process", [o for o in lora if o != "parallel.type=single"] +
            ["parallel.type=zero", "parallel.stage=3"])
        row("mllmkit full, single, checkpointing", full + ["parallel.type=single"], SFT_RECIPE)
        if not args.tiny:
            row("mllmkit full + liger packed, single, checkpointing", full + ["parallel.type=single"] + fast, SFT_RECIPE)
        result["errors"] = {}
        rows = run_rows(planned, args.rows, result["errors"])
    bases = {row["row"]: row for row in rows if row["row"].startswith("peft baseline")}
    table = []
    for row in rows:
        row["required_flops_per_sample"] = required_flops(row["row"], costs)
        row["mfu"] = row["samples_per_s"] * row["required_flops_per_sample"] / (matmul * 1e12)
        base = bases.get("peft baseline, no checkpointing" if "no checkpointing" in row["row"] else "peft baseline")
        lora_row = "lora" in row["row"] and base is not None
        row["vs_peft"] = row["samples_per_s"] / base["samples_per_s"] if lora_row else None
        table.append([row["row"], f"{row['samples_per_s']:.2f}", f"{row['labelled_tokens_per_s']:.0f}",
                      f"{row['peak_gb']:.1f}", f"{100 * row['mfu']:.1f}%",
                      f"{row['vs_peft']:.2f}x" if row["vs_peft"] is not None else "-", row["measured_steps"]])
    result["rows"] = rows
    B.write_result("finetune_7b_tiny" if args.tiny else "finetune_7b", result, args.tiny)
    print(f"device {result['device']}, torch {result['torch']}, transformers {result['transformers']}; "
          f"bf16 matmul {matmul:.0f} TFLOP/s; {costs['mean_tokens']:.0f} tokens "
          f"({costs['mean_labelled_tokens']:.0f} labelled) per sample; LoRA {costs['llm_lora_params'] / 1e6:.1f}M")
    B.print_table("fine-tuning the 7B LLM, one device", ["row", "samples/s", "labelled tok/s", "peak GB", "MFU",
                                                         "vs peft", "steps"], table)
    for name in result["errors"]:
        print(f"{name}: failed (the traceback is in the JSON)")


if __name__ == "__main__":
    main()
