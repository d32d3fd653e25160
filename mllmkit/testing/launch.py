"""Test helpers: a tiny recipe and torchrun launches of ``mllmkit run`` on the CPU (gloo, free port).

Used by the distributed tests of the core (``ddp``, ``zero``) and of backend plugins; each launch
sets ``DS_ACCELERATOR=cpu``, a workspace ``TORCH_EXTENSIONS_DIR`` (DeepSpeed's JIT-built ops are
cached there) and its own ``TMPDIR``.
"""

from __future__ import annotations

__all__ = ["TINY_RECIPE", "convert_and_chat_load", "ds_env", "free_port", "losses", "torchrun"]

import json
import os
import pathlib
import subprocess
import sys

from mllmkit.train.dist import free_port

CACHE = pathlib.Path(os.environ.get("MLLMKIT_TEST_CACHE", pathlib.Path(__file__).resolve().parents[2] / ".cache"))

TINY_RECIPE = """
[model.vision]
type = "eva_tiny"

[[model.bridges]]
type = "qformer_tiny"

[[model.bridges]]
type = "linear"

[model.llm]
type = "qwen"
preset = "qwen_tiny"
precision = "fp32"

[[data.train]]
type = "demo_shapes"
size = 64

[train]
max_steps = 3
lr = 1e-3
micro_batch_size = 2
grad_accum = 2
precision = "fp32"
device = "cpu"
log_every = 1
tensorboard = false
seed = 1
keep_last = 5

[parallel]
type = "single"
"""


def ds_env(tmp: pathlib.Path) -> dict[str, str]:
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TORCH_EXTENSIONS_DIR": str(CACHE / "torch_extensions"), "OMP_NUM_THREADS": "1",
            "TMPDIR": str(tmp / "tmp"), "MASTER_ADDR": "127.0.0.1"}


def torchrun(nproc: int, recipe: pathlib.Path, out: pathlib.Path, *overrides: str, resume: str | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "mllmkit.cli", "run", str(recipe),
               "--output-dir", str(out)]
    for override in overrides:
        command += ["--set", override]
    if resume:
        command += ["--resume", resume]
    return subprocess.run(command, env=ds_env(out.parent), capture_output=True, text=True, timeout=timeout,
                          check=False)


def losses(run_dir: pathlib.Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def convert_and_chat_load(run: pathlib.Path, target: pathlib.Path, saved: dict) -> None:
    """``mllmkit convert`` of the run's step-3 checkpoint loads in chat with exactly the trained tensors."""
    import torch

    from mllmkit.chat.loading import load_chat_model
    from mllmkit.cli import main

    assert main(["convert", str(run / "checkpoints" / "step_0000003"), "--to", str(target)]) == 0
    model, _ = load_chat_model(target, device="cpu", precision="fp32")
    torch.testing.assert_close(model.bridges[1].proj.weight, saved["bridges.1.proj.weight"])
    torch.testing.assert_close(model.bridges[1].proj.bias, saved["bridges.1.proj.bias"])
