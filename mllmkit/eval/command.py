"""``mllmkit eval RECIPE --checkpoint CKPT --task NAME [--data PATH] [--limit N] [--out DIR]``.

Loads the model as ``mllmkit chat`` does (recipe or export folder, trained weights, device and
precision from ``[chat]`` unless given), builds the task (its options from the recipe's
``[[eval.tasks]]`` table of that type when there is one, ``--data`` and ``--limit`` on top), answers
greedily, prints the metrics table and writes the report (:mod:`mllmkit.eval.report`) to ``--out``
(default ``eval/<task>`` in the checkpoint's parent folder, e.g. ``runs/demo/eval/pope``; else under the
current directory). The system prompt is ``--system``, else the recipe's ``data.system`` (what
training used), else the template's.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["build_task", "evaluate_checkpoint", "register_command"]


def build_task(name: str, recipe, model, *, data: str | None = None, limit: int | None = None):
    """The task ``name`` with the recipe's ``[[eval.tasks]]`` options for it, then ``data``/``limit``."""
    from mllmkit.interfaces import BuildContext
    from mllmkit.plugins import get_plugin_host
    from mllmkit.recipe.structure import structure

    registry = get_plugin_host().registry
    spec = registry.get("eval_task", name)
    table = next((c.to_dict() for c in recipe.eval_tasks if c.type == name), {})
    options = {k: v for k, v in table.items() if k != "type"}
    if data is not None:
        options["data"] = str(pathlib.Path(data).resolve())
    if limit is not None:
        options["limit"] = limit
    config = structure(spec.config, options, f"task {name}", pathlib.Path.cwd())
    return spec.build(config, BuildContext(key=f"eval.{name}", recipe_dir=recipe.dir, model=model, recipe=recipe)), config


def evaluate_checkpoint(recipe: Any, tasks: Sequence[str], *, checkpoint: str | None = None, data: str | None = None,
                        limit: int | None = None, out: str | pathlib.Path | None = None, device: str | None = None,
                        precision: str | None = None, system: str | None = None, batch_size: int | None = None,
                        overrides: Sequence[str] = (), progress: bool = True) -> tuple[pathlib.Path, list]:
    """Evaluate ``recipe`` + ``checkpoint`` on ``tasks``; returns the report folder and the task results."""
    from mllmkit.chat.loading import load_chat_model
    from mllmkit.data.collate import SampleEncoder
    from mllmkit.eval.report import stamp, write_report
    from mllmkit.eval.runner import run_task
    from mllmkit.recipe.structure import unstructure

    started, clock = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    model, loaded = load_chat_model(recipe, checkpoint=checkpoint, device=device, precision=precision,
                                    overrides=overrides)
    checkpoint = checkpoint or loaded.chat.checkpoint or (recipe if pathlib.Path(str(recipe)).is_dir() else None)
    system = system if system is not None else loaded.data.system
    batch_size = batch_size or loaded.eval.batch_size
    max_positions = getattr(model.llm, "max_positions", None) or 4096
    results, options = [], {}
    for name in tasks:
        task, config = build_task(name, loaded, model, data=data, limit=limit)
        encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False),
                                max_positions - task.max_new_tokens, system=system)
        results.append(run_task(model, task, encoder, batch_size=batch_size, limit=config.limit, progress=progress))
        options[name] = unstructure(config)
    settings = stamp(model, loaded, checkpoint=checkpoint, system=system,
                     precision=precision or loaded.chat.precision, batch_size=batch_size)
    settings["task_options"] = options
    if out is None:
        # beside the checkpoint, not inside an export folder (its sha256 covers every file in it)
        base = pathlib.Path(checkpoint).resolve().parent if checkpoint else pathlib.Path.cwd()
        out = base / "eval" / "+".join(tasks)
    run = {"started": started, "wall_s": time.perf_counter() - clock, "command": sys.argv}
    return write_report(pathlib.Path(out), results, settings, run), results


def _cmd_eval(args: argparse.Namespace) -> int:
    from mllmkit.errors import UserError
    from mllmkit.eval.report import markdown

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, found {args.limit}")
    folder, results = evaluate_checkpoint(args.recipe, args.task, checkpoint=args.checkpoint, data=args.data,
                                          limit=args.limit, out=args.out, device=args.device, precision=args.precision,
                                          system=args.system, batch_size=args.batch_size, overrides=args.overrides)
    import json

    settings = json.loads((folder / "results.json").read_text())["settings"]
    print(markdown(results, settings), end="")
    for result in results:
        for problem in result.problems[:5]:
            print(f"  {result.name}: not used: {problem.file} record {problem.index}: {problem.reason}", file=sys.stderr)
        if len(result.problems) > 5:
            print(f"  {result.name}: {len(result.problems) - 5} more records not used (results.json lists them)",
                  file=sys.stderr)
        if result.unparsed:
            print(f"  {result.name}: {len(result.unparsed)} answer(s) could not be parsed (counted wrong): "
                  f"{', '.join(result.unparsed[:5])}", file=sys.stderr)
    print(f"report: {folder}")
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="evaluate a model on benchmark tasks; writes a report")
    evaluate.add_argument("recipe", help="a TOML recipe, or an mllmkit export folder (recipe.toml + weights)")
    evaluate.add_argument("--checkpoint", metavar="PATH", help="trained weights (as for mllmkit chat)")
    evaluate.add_argument("--task", action="append", required=True, metavar="NAME",
                          help="task name (mllmkit plugins lists them: heldout, demo_shapes, pope, mme, mmbench, "
                               "vqav2, textvqa, ...); repeatable")
    evaluate.add_argument("--data", metavar="PATH", help="where the benchmark's files are (the task's data option)")
    evaluate.add_argument("--limit", type=int, metavar="N", help="ask only the first N questions of each task")
    evaluate.add_argument("--out", metavar="DIR", help="report folder (default: eval/<task> in the checkpoint's parent folder)")
    evaluate.add_argument("--batch-size", type=int, metavar="N", help="questions answered together (default: "
                                                                      "eval.batch_size)")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: chat.device")
    evaluate.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: chat.precision")
    evaluate.add_argument("--system", help="system prompt (default: data.system, else the LLM template's)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a recipe value (repeatable)")
    evaluate.set_defaults(func=_cmd_eval)
