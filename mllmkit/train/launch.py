"""``mllmkit run``: pick the run folder, launch torchrun when asked, train, print how to chat.

With ``--nproc-per-node N`` (and not already under torchrun) this starts
``python -m torch.distributed.run --nproc_per_node N --master_addr 127.0.0.1 --master_port <free>
-m mllmkit.cli run ...`` and returns its exit code; every worker then reads torchrun's environment.
A recipe whose parallel backend needs several processes (``processes_needed()``: a pipeline, one per
stage) without a launcher and without ``--nproc-per-node`` starts that many itself.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from mllmkit.errors import UserError
from mllmkit.train.dist import free_port

__all__ = ["default_run_dir", "run_command", "torchrun_command"]


def default_run_dir(recipe) -> pathlib.Path:
    """``train.output_dir``, else ``./runs/<recipe file name>``."""
    if recipe.train.output_dir is not None:
        return recipe.train.output_dir
    name = recipe.path.stem if recipe.path is not None else "run"
    return pathlib.Path.cwd() / "runs" / name


def torchrun_command(recipe: str, overrides: list[str], resume: str | None, nproc_per_node: int,
                     output_dir: str | None) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mllmkit.cli", "run", recipe]
    for override in overrides:
        command += ["--set", override]
    if resume is not None:
        command += ["--resume", resume]
    if output_dir is not None:
        command += ["--output-dir", output_dir]
    return command


def run_command(recipe: str, overrides: list[str], resume: str | None = None, nproc_per_node: int | None = None,
                output_dir: str | None = None) -> int:
    """Train the recipe; returns the process exit code."""
    if nproc_per_node is not None and nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, found {nproc_per_node}")
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import build_backend, train

    loaded = load_recipe(recipe, overrides)  # a bad recipe stops here, before any process starts
    missing = loaded.missing_inputs()
    if missing:
        raise UserError("the recipe names inputs that are not there (paths are relative to the recipe's "
                        "folder, then $MLLMKIT_HOME):\n  " + "\n  ".join(missing))
    launched = "LOCAL_RANK" in os.environ
    needed = build_backend(loaded).processes_needed()
    if nproc_per_node is None and not launched and needed > 1:
        print(f"mllmkit: parallel.type = '{loaded.parallel.type}' needs {needed} processes: starting them with "
              f"torchrun (--nproc-per-node N for data parallel as well)", file=sys.stderr, flush=True)
        nproc_per_node = needed
    if nproc_per_node is not None and not launched:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.call(torchrun_command(recipe, overrides, resume, nproc_per_node, output_dir), env=env)

    run_dir = pathlib.Path(output_dir).resolve() if output_dir else default_run_dir(loaded)
    result = train(loaded, run_dir, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nfinished {result.steps} steps; run folder: {result.run_dir}")
        if result.losses:
            print(f"  last training loss: {result.losses[-1]:.4f}")
        if result.eval:
            line = f"  held-out: loss {result.eval['eval_loss']:.4f}, exact match {result.eval['eval_accuracy']:.1%} " \
                   f"of {result.eval['eval_questions']} questions"
            if "chance_accuracy" in result.eval:
                line += f" (chance {result.eval['chance_accuracy']:.1%})"
            print(line)
        if result.export_dir is not None:
            print(f"chat with it:  mllmkit chat {recipe} --checkpoint {result.export_dir}")
    return 0
