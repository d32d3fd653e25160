"""``mllmkit export RECIPE --checkpoint CKPT --to DIR [--verify]``: the command line of :func:`export_model`."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register_command"]


def _cmd_export(args: argparse.Namespace) -> int:
    from mllmkit.export.write import export_model

    result = export_model(args.recipe, args.checkpoint, args.to, overrides=tuple(args.overrides), dtype=args.dtype,
                          max_shard_size=args.max_shard_size, verify=args.verify, verify_device=args.verify_device)
    print(f"wrote {result['folder']}: {result['target']} (load it with transformers, no remote code)")
    for note in result["notes"]:
        print(f"  note: {note}")
    if result["verify"] is not None:
        print("verified with transformers:")
        print(result["verify"].describe())
    return 0


def register_command(sub: Any) -> None:
    parser = sub.add_parser("export", help="write a trained model as a transformers folder "
                                           "(Blip2ForConditionalGeneration or LlavaForConditionalGeneration, chosen "
                                           "by its parts; tokenizer, chat template, processor), optionally "
                                           "parity-checked")
    parser.add_argument("recipe", help="the recipe the model was trained with (or an mllmkit export folder)")
    parser.add_argument("--checkpoint", metavar="CKPT", help="trained weights (any layout mllmkit chat loads)")
    parser.add_argument("--to", required=True, metavar="DIR", help="folder to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                        help="dtype of the exported tensors (default: the recipe's chat.precision)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--verify", action="store_true",
                        help="load the folder with transformers and compare logits, greedy tokens and token ids; "
                             "a difference stops the export (exit 2)")
    parser.add_argument("--verify-device", default="cpu", choices=("cpu", "cuda"),
                        help="where --verify runs: cpu compares in fp32 (logits within 1e-4), cuda in bf16 (reported)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.set_defaults(func=_cmd_export)
