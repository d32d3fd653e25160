"""The ``mllmkit`` command: run | check | print-config | plugins | chat | webui | convert | new-plugin.

Every command goes through the public API only. A user error (bad recipe, missing file) prints one
message without a traceback and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from mllmkit.errors import UserError
from mllmkit.train.launch import report_to_launcher

__all__ = ["main", "build_parser"]


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set train.lr=2e-4 (repeatable)")


def _cmd_check(args: argparse.Namespace) -> int:
    from mllmkit import check_wiring, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    wiring = check_wiring(recipe)
    _check_run_settings(recipe)
    chain = [f"{recipe.vision.type} ({wiring.vision.out_dim}d × {wiring.vision.out_tokens} tokens)"]
    for bridge, dims in zip(recipe.bridges, wiring.bridges):
        tokens = f" × {dims.out_tokens} tokens" if dims.out_tokens else ""
        chain.append(f"{bridge.type} ({dims.out_dim}d{tokens})")
    chain.append(f"{recipe.llm.type} (hidden {wiring.llm.out_dim})")
    print(f"ok: {recipe.path}")
    print("  model:    " + " → ".join(chain))
    print("  data:     " + ", ".join(d.type for d in recipe.train_data))
    print(f"  parallel: {recipe.parallel.type}")
    for line in recipe.missing_inputs():
        print(f"  not there yet (mllmkit run needs it): {line}")
    return 0


def _check_run_settings(recipe) -> None:
    """What ``mllmkit run`` would refuse later, refused by ``check`` now (with key paths)."""
    from mllmkit.errors import RecipeError

    file = str(recipe.path) if recipe.path else "<recipe>"
    if not recipe.train_data:
        raise RecipeError("data.train", "no training data: mllmkit run needs at least one [[data.train]] table "
                                        "(type = a dataset component)", file=file)
    for key in recipe.train.lr_scale:
        if key.startswith("bridges.") and int(key.split(".")[1]) >= len(recipe.bridges):
            raise RecipeError(f"train.lr_scale.{key}", f"matches no part: the recipe has {len(recipe.bridges)} "
                                                       f"bridge(s), bridges.0 to bridges.{len(recipe.bridges) - 1}",
                              file=file)


def _cmd_print_config(args: argparse.Namespace) -> int:
    import tomli_w

    from mllmkit import load_recipe

    sys.stdout.write(tomli_w.dumps(load_recipe(args.recipe, args.overrides).to_dict()))
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from mllmkit.plugins import get_plugin_host
    from mllmkit.registry import KINDS

    host = get_plugin_host()
    for info in host.plugins:
        print(f"{info.name}  ({info.distribution} {info.version})")
        for kind in KINDS:
            specs = [s for s in host.registry.specs(kind) if s.distribution == info.distribution]
            for spec in specs:
                print(f"    {kind:<9} {spec.name:<28} {spec.description}")
    for broken in host.broken:
        print(f"{broken.name}  ({broken.distribution})  FAILED TO LOAD: {broken.error}")
    return 1 if host.broken else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mllmkit.train.launch import run_command

    return run_command(args.recipe, args.overrides, resume=args.resume, nproc_per_node=args.nproc_per_node,
                       output_dir=args.output_dir)


def build_parser() -> argparse.ArgumentParser:
    from mllmkit import __version__

    parser = argparse.ArgumentParser(prog="mllmkit", description="Assemble, train and chat with multimodal LLMs.")
    parser.add_argument("--version", action="version", version=f"mllmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="train (or evaluate) as the recipe says")
    _add_recipe_args(run)
    run.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint (auto: the latest in the run folder)")
    run.add_argument("--nproc-per-node", type=int, metavar="N", help="launch N processes with torchrun")
    run.add_argument("--output-dir", metavar="DIR", help="run folder (default: train.output_dir)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a recipe and its wiring without reading weights")
    _add_recipe_args(check)
    check.set_defaults(func=_cmd_check)

    show = sub.add_parser("print-config", help="print the resolved recipe with every default")
    _add_recipe_args(show)
    show.set_defaults(func=_cmd_print_config)

    plugins = sub.add_parser("plugins", help="list installed plugins and the components they register")
    plugins.set_defaults(func=_cmd_plugins)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Commands defined beside the code they drive (chat, webui, convert, new-plugin)."""
    import importlib

    found = []
    for module_name in ("mllmkit.chat.commands", "mllmkit.convert", "mllmkit.scaffold", "mllmkit.serve.command",
                        "mllmkit.eval.command", "mllmkit.export.command"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        found.append(module.register_command)
    return found


_EXTRA_COMMANDS = _extra_commands()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:  # a worker of `mllmkit run --nproc-per-node` reports to the launcher instead
        if not report_to_launcher(str(exc), with_traceback=False):
            print(f"mllmkit: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if not report_to_launcher(f"{type(exc).__name__}: {exc}", with_traceback=True):
            raise
        return 1
    except KeyboardInterrupt:
        print("mllmkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
