"""The ``mllmkit serve`` command: load a model, then run the OpenAI-compatible API under uvicorn.

``mllmkit serve RECIPE [--checkpoint CKPT]`` assembles the recipe and loads trained weights through
the chat loader (:func:`mllmkit.chat.loading.load_chat_model`); ``mllmkit serve [RECIPE] --model
EXPORT`` loads an exported folder through :func:`mllmkit.export.load_export`. The recipe's ``[chat]``
section gives the default decoding settings, system prompt and history window. The server binds
127.0.0.1 unless told otherwise; SIGTERM / Ctrl-C stop accepting connections and finish the
requests already in flight before the process exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pathlib
import sys

from mllmkit.errors import UserError
from mllmkit.serve.images import ImageLimits

__all__ = ["build_server", "register_command"]


def build_server(engine, *, host: str, port: int, model_name: str, api_key: str | None = None,
                 image_limits=None, max_body_bytes: int = 32 * 1024 * 1024, log_level: str = "info"):
    """A ``uvicorn.Server`` for the API over ``engine`` (start the engine, then ``server.run()``).
    Shutdown waits for every request in flight (no graceful-shutdown timeout), then stops the engine."""
    import uvicorn

    from mllmkit.serve.app import create_app

    app = create_app(engine, model_name=model_name, api_key=api_key, image_limits=image_limits,
                     max_body_bytes=max_body_bytes)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=None))


def _load(args: argparse.Namespace):
    """The model, the recipe's chat section (or None) and the name the API serves it under."""
    from mllmkit import load_recipe

    if args.model is not None:
        try:
            from mllmkit.export import load_export
        except ImportError as exc:
            raise UserError(f"--model needs mllmkit.export.load_export, which this installation lacks ({exc}); "
                            f"serve the recipe with --checkpoint instead") from None
        folder = pathlib.Path(args.model)
        if not folder.is_dir():
            raise UserError(f"--model {folder}: not a folder (give the folder mllmkit export --to wrote)")
        recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
        device = args.device or (recipe.chat.device if recipe else None)
        from mllmkit.chat.loading import resolve_device

        model = load_export(folder, device=str(resolve_device(device)),
                            precision=args.precision or (recipe.chat.precision if recipe else None))
        return model, recipe.chat if recipe else None, folder.resolve().name
    if args.recipe is None:
        raise UserError("give a recipe (mllmkit serve RECIPE --checkpoint CKPT) or an exported folder (--model DIR)")
    from mllmkit.chat.loading import load_chat_model

    model, recipe = load_chat_model(args.recipe, checkpoint=args.checkpoint, device=args.device,
                                    precision=args.precision, overrides=args.overrides)
    name = pathlib.Path(args.recipe).resolve()
    return model, recipe.chat, name.name if name.is_dir() else name.stem


def _check(args: argparse.Namespace) -> None:
    for flag in ("max_batch", "max_queue", "max_images", "max_image_pixels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, found {value}")
    if args.max_body_mb <= 0:
        raise UserError(f"--max-body-mb must be positive, found {args.max_body_mb}")
    if args.allow_dir is not None and not pathlib.Path(args.allow_dir).is_dir():
        raise UserError(f"--allow-dir {args.allow_dir}: not a folder")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, found {args.port}")


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _cmd_serve(args: argparse.Namespace) -> int:
    from mllmkit.generation_settings import GenerationSettings
    from mllmkit.serve.engine import Engine

    _check(args)
    api_key = args.api_key or os.environ.get("MLLMKIT_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"mllmkit serve: warning: listening on {args.host} without an API key: anyone who reaches this "
              f"port can use the model (set --api-key or MLLMKIT_API_KEY)", file=sys.stderr)
    model, chat, name = _load(args)
    settings = GenerationSettings.from_chat_section(chat) if chat is not None else GenerationSettings()
    on_gpu = model.llm.embedding.weight.device.type == "cuda"
    engine = Engine(model, settings=settings,
                    system=args.system if args.system is not None else (chat.system if chat else None),
                    max_window_tokens=chat.max_window_tokens if chat else 6144,
                    max_batch=args.max_batch or (32 if on_gpu else 1), max_queue=args.max_queue)
    limits = ImageLimits(max_images=args.max_images, max_pixels=args.max_image_pixels,
                         allow_dir=pathlib.Path(args.allow_dir) if args.allow_dir else None)
    server = build_server(engine, host=args.host, port=args.port, model_name=args.served_model_name or name,
                          api_key=api_key, image_limits=limits, max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    print(f"mllmkit serve: {args.served_model_name or name} on http://{args.host}:{args.port}/v1 "
          f"(batches of up to {engine.max_batch}, queue {engine.max_queue})", file=sys.stderr, flush=True)
    engine.start()
    server.run()  # on SIGTERM/SIGINT: finishes the requests in flight, stops the engine, then exits by that signal
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    defaults = ImageLimits()
    serve = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API "
                                                "(pip install mllmkit[serve])")
    serve.add_argument("recipe", nargs="?", help="a TOML recipe or an mllmkit export folder (optional with --model)")
    weights = serve.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="CKPT", help="trained weights for the recipe (as mllmkit chat takes)")
    weights.add_argument("--model", metavar="EXPORT", help="a folder written by mllmkit export")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: "
                                                        "$MLLMKIT_API_KEY, else no key)")
    serve.add_argument("--allow-dir", metavar="DIR", help="serve file:// image URLs under DIR (default: refused)")
    serve.add_argument("--served-model-name", metavar="NAME", help="the model id of the API (default: the "
                                                                   "recipe's or folder's name)")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: chat.device")
    serve.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: chat.precision")
    serve.add_argument("--system", help="system prompt (default: chat.system, else the LLM template's)")
    serve.add_argument("--max-batch", type=int, metavar="N", help="requests decoded together (default: 32 on a "
                                                                  "GPU, 1 on CPU)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting at most; more are refused with 429 (default 64)")
    serve.add_argument("--max-images", type=int, default=defaults.max_images, metavar="N",
                       help=f"images in one request (default {defaults.max_images})")
    serve.add_argument("--max-image-pixels", type=int, default=defaults.max_pixels, metavar="N",
                       help=f"width x height of one image (default {defaults.max_pixels})")
    serve.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                       help="largest request body (default 32)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe value, e.g. --set chat.max_new_tokens=64 (repeatable)")
    serve.set_defaults(func=_cmd_serve)
