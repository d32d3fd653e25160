"""The ``mllmkit chat`` and ``mllmkit webui`` commands (registered into the CLI by :mod:`mllmkit.cli`)."""

from __future__ import annotations

import argparse

__all__ = ["register_command"]


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a TOML recipe, or an mllmkit export folder (recipe.toml + weights)")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="trained weights: export folder, trainable.safetensors, or the seed's "
                             "checkpoint_N.pth / model.pth / mp_rank_00_model_states.pt (default: chat.checkpoint)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: chat.device")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: chat.precision")
    parser.add_argument("--system", help="system prompt (default: chat.system, else the LLM template's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set chat.max_new_tokens=64 (repeatable)")


def _session(args: argparse.Namespace):
    from mllmkit.chat import chat_session
    from mllmkit.threads import set_cpu_threads

    set_cpu_threads()

    return chat_session(args.recipe, checkpoint=args.checkpoint, device=args.device, precision=args.precision,
                        overrides=args.overrides, system=args.system)


def _cmd_chat(args: argparse.Namespace) -> int:
    from mllmkit.chat.repl import run_repl

    return run_repl(_session(args), images=tuple(args.image))


def _cmd_webui(args: argparse.Namespace) -> int:
    from mllmkit.chat.webui import launch

    if args.max_upload_mb <= 0:
        from mllmkit.errors import UserError

        raise UserError(f"--max-upload-mb must be positive, found {args.max_upload_mb}")
    launch(_session(args), host=args.host, port=args.port, share=args.share, max_upload_mb=args.max_upload_mb)
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal (reads stdin line by line)")
    _model_args(chat)
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image for the first question (repeatable)")
    chat.set_defaults(func=_cmd_chat)

    webui = subparsers.add_parser("webui", help="chat with a model in the browser (gradio; pip install mllmkit[webui])")
    _model_args(webui)
    webui.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    webui.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    webui.add_argument("--share", action="store_true", help="also open a public gradio share link")
    webui.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                       help="largest image upload accepted (default 10)")
    webui.set_defaults(func=_cmd_webui)
