"""Bad recipes: each error names the file, the key path, what was expected and what was found."""

from __future__ import annotations

import sys
import textwrap

import pytest

from mllmkit import check_wiring, load_recipe
from mllmkit.errors import RecipeError
from mllmkit.testing.toy import TOY_MODEL_TOML

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

GOOD = TOY_MODEL_TOML

BAD_RECIPES = [
    # (recipe text, expected key path, fragment of the message)
    (GOOD.replace('type = "toy_vision"', 'type = "toy_visoin"'), "model.vision.type",
     "unknown vision component 'toy_visoin'; available: toy_vision"),
    (GOOD.replace('type = "toy_llm"', 'type = 3'), "model.llm.type", "expected a string, found 3"),
    (GOOD.replace('type = "toy_llm"', ''), "model.llm.type", "required: name the llm component; available: toy_llm"),
    (GOOD.replace('type = "linear"', 'type = "liner"'), "model.bridges[0].type",
     "unknown bridge component 'liner'; available: linear, mlp"),
    (GOOD + "\n[train]\nlr = \"fast\"\n", "train.lr", 'expected a number, found "fast" (string)'),
    (GOOD + "\n[train]\nlr = -1.0\n", "train.lr", "expected a value > 0, found -1.0"),
    (GOOD + "\n[train]\nepochs = 1.5\n", "train.epochs", "expected an integer, found 1.5 (float)"),
    (GOOD + "\n[train]\nepoch = 2\n", "train.epoch", "unknown option; did you mean 'epochs'?"),
    (GOOD + "\n[train]\nprecision = \"bf17\"\n", "train.precision",
     'expected one of "fp32", "bf16", "fp16", found "bf17" (string)'),
    (GOOD + "\n[train]\nloss_reduction = \"mean\"\n", "train.loss_reduction", 'expected one of "token", "sample"'),
    (GOOD + "\n[train]\nbetas = 0.9\n", "train.betas", "expected a list of numbers, found 0.9 (float)"),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ngradient_checkpointing = "yes"'),
     "model.llm.gradient_checkpointing", 'expected true or false, found "yes" (string)'),
    (GOOD + "\n[train]\ngradient_checkpointing = true\n", "train.gradient_checkpointing", "unknown option"),
    (GOOD + "\n[data]\non_error = \"ignore\"\n", "data.on_error", 'expected one of "skip", "fail"'),
    (GOOD + "\n[chat]\ntop_p = 1.5\n", "chat.top_p", "expected a value in [0.0, 1.0], found 1.5"),
    (GOOD + "\n[trian]\nlr = 1.0\n", "trian", "unknown option; did you mean 'train'?"),
    (GOOD.replace("[model.vision]", "[model.visoin]"), "model.visoin", "unknown option; did you mean 'vision'?"),
    (GOOD.replace('type = "toy_vision"', 'type = "toy_vision"\nwidth = "wide"'), "model.vision.width",
     'expected an integer, found "wide" (string)'),
    (GOOD.replace('type = "toy_vision"', 'type = "toy_vision"\nwidht = 8'), "model.vision.widht",
     "unknown option; did you mean 'width'? Allowed options here: image_size, patch_size, width, trainable"),
    (GOOD + "\n[run]\nsteps = 1\n", "run",
     "unknown option. Allowed options here: model, data, train, parallel, chat, eval, extends"),
    (GOOD.replace('type = "linear"', 'type = "linear"\nout_dim = 0'), "model.bridges[0].out_dim",
     "expected a value > 0, found 0"),
    (GOOD.replace("[[model.bridges]]", "[model.bridges]"), "model.bridges",
     "expected an array of tables, found a table"),
    (GOOD.replace('type = "linear"', 'type = "linear"\nweights = 5'), "model.bridges[0].weights",
     "expected a path (string), found 5 (integer)"),
    (GOOD + "\n[parallel]\ntype = \"mpi\"\n", "parallel.type", "unknown parallel component 'mpi'"),
    (GOOD + "\n[[data.train]]\nname = \"x\"\n", "data.train[0].type", "required: name the dataset component"),
    ("[model]\n", "model.vision", "required option is missing (expected a table)"),
    ("[train]\nlr = 1.0\n", "model", "required: a recipe needs [model.vision]"),
    (GOOD + "\n[train]\nmax_text_len = 0\n", "train.max_text_len", "expected a value > 0, found 0"),
    # the keys every part shares: one spelling each, the core's
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ndtype = "bf16"'), "model.llm.dtype",
     "unknown option; did you mean 'precision'? Allowed options here: hidden_size, num_layers, num_heads, "
     "trainable, precision, tune, lora, gradient_checkpointing, quantize"),
    (GOOD.replace('type = "toy_vision"', 'type = "toy_vision"\ngrad_checkpointing = true'),
     "model.vision.grad_checkpointing", "unknown option; did you mean 'gradient_checkpointing'?"),
    (GOOD.replace('type = "linear"', 'type = "linear"\ntorch_dtype = "fp16"'), "model.bridges[0].torch_dtype",
     "unknown option; did you mean 'precision'? Allowed options here: in_dim, out_dim, bias, weights, prefix, "
     "trainable, precision"),
    (GOOD.replace('type = "linear"', 'type = "linear"\ngradient_checkpointing = true'),
     "model.bridges[0].gradient_checkpointing", "unknown option."),
    (GOOD.replace('type = "toy_vision"', 'type = "toy_vision"\nprecision = "half"'), "model.vision.precision",
     'expected one of "fp32", "fp16", "bf16", found "half" (string)'),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntrainable = "yes"'), "model.llm.trainable",
     'expected true or false, found "yes" (string)'),
    (GOOD + '\n[[data.train]]\ntype = "llava_conversations"\nannotations = "a.json"\nweight = -1.0\n',
     "data.train[0].weight", "expected a value >= 0, found -1.0"),
    (GOOD + '\n[parallel]\ntype = "single"\ndtype = "bf16"\n', "parallel.dtype", "unknown option."),
    # the fine-tuning policy: tune (trainable is its on/off short form), the lora table, quantize
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "full"\ntrainable = false'), "model.llm.tune",
     'is "full" but trainable = false; keep one of them (tune = "frozen" | "full" | "lora"; trainable = true/false '
     'is the short form of "full"/"frozen")'),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "qlora"'), "model.llm.tune",
     'expected one of "frozen", "full", "lora", found "qlora" (string)'),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\nfinetune = "lora"'), "model.llm.finetune",
     "unknown option; did you mean 'tune'?"),
    (GOOD + '\n[model.llm.lora]\nr = 8\n', "model.llm.lora",
     'LoRA options, but tune = unset; set tune = "lora" or remove the lora table'),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "lora"\nlora = {r = 0}'), "model.llm.lora.r",
     "expected a value > 0, found 0"),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "lora"\nlora = {dropout = 1.0}'),
     "model.llm.lora.dropout", "expected a value in [0, 1), found 1.0"),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "lora"\nlora = {targets = []}'),
     "model.llm.lora.targets", "expected a non-empty list of module-name patterns"),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\ntune = "lora"\nlora = {rank = 8}'), "model.llm.lora.rank",
     "unknown option. Allowed options here: r, alpha, dropout, targets, bias"),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\nquantize = "nf4"'), "model.llm.quantize",
     'a quantized LLM trains through adapters only; set tune = "lora" (found unset) or quantize = "none"'),
    (GOOD.replace('type = "toy_llm"', 'type = "toy_llm"\nload_in_4bit = true'), "model.llm.load_in_4bit",
     "unknown option; did you mean 'quantize'?"),
    (GOOD + "\n[model]\ninit_from = 3\n", "model.init_from", "expected a path (string), found 3 (integer)"),
]


@pytest.mark.parametrize("text, key, fragment", BAD_RECIPES, ids=[k for _, k, _ in BAD_RECIPES])
def test_bad_recipe_names_key_and_fix(core_plugin_host, tmp_path, text, key, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert info.value.key == key
    assert message.startswith(f"{path}: {key}: ")
    assert fragment in message


def test_at_least_twenty_distinct_bad_recipes():
    assert len({key for _, key, _ in BAD_RECIPES}) >= 20


def test_toml_syntax_error_names_file(core_plugin_host, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\n")
    with pytest.raises(RecipeError, match=rf"^{path}: not valid TOML: "):
        load_recipe(path)


def test_wrong_explicit_bridge_width_rejected_at_check(core_plugin_host, tmp_path):
    path = tmp_path / "dims.toml"
    path.write_text(GOOD.replace('type = "linear"', 'type = "linear"\nin_dim = 99'))
    with pytest.raises(RecipeError) as info:
        check_wiring(load_recipe(path))
    assert str(info.value) == (f"{path}: model.bridges[0]: linear expects input width 99, but model.vision "
                               "(toy_vision) outputs 24; set in_dim = 24 or leave it out to infer it")


def test_last_bridge_must_end_at_llm_hidden(core_plugin_host, tmp_path):
    path = tmp_path / "dims.toml"
    path.write_text(GOOD.replace('type = "linear"', 'type = "linear"\nout_dim = 50'))
    with pytest.raises(RecipeError) as info:
        check_wiring(load_recipe(path))
    assert str(info.value).endswith("model.bridges[0]: the last bridge outputs width 50, but the LLM toy_llm has "
                                    "hidden size 32; set out_dim = 32 or leave it out to infer it")


def test_good_recipe_fills_defaults(core_plugin_host, tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    recipe = load_recipe(path)
    assert recipe.vision.config.width == 24
    assert recipe.bridges[0].shared.trainable is True
    assert (recipe.vision.shared.trainable, recipe.vision.shared.precision) == (False, "fp32")
    assert recipe.train.loss_reduction == "token"
    assert recipe.parallel.type == "single"
    wiring = check_wiring(recipe)
    assert (wiring.vision.out_dim, wiring.vision.out_tokens, wiring.bridges[0].out_dim, wiring.llm.out_dim) == (24, 5, 32, 32)


def test_missing_inputs_stop_mllmkit_run_before_it_starts(core_plugin_host, tmp_path, capsys):
    from mllmkit.cli import main

    (tmp_path / "there.json").write_text("[]")
    path = tmp_path / "inputs.toml"
    path.write_text(GOOD.replace('type = "linear"', 'type = "linear"\nweights = "ckpt/proj.pth"') + textwrap.dedent("""
        [[data.train]]
        type = "minigpt4qwen_instruction"
        annotations = "there.json"
        images = "images"

        [[data.eval]]
        type = "llava_conversations"
        annotations = "eval.json"
        """))
    missing = [f"model.bridges[0].weights: not found: {tmp_path / 'ckpt/proj.pth'}",
               f"data.train[0].images: not found: {tmp_path / 'images'}",
               f"data.eval[0].annotations: not found: {tmp_path / 'eval.json'}"]
    assert load_recipe(path).missing_inputs() == missing
    assert main(["run", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("mllmkit: error: the recipe names inputs that are not there (paths are relative "
                                       "to the recipe's folder, then $MLLMKIT_HOME):\n  " + "\n  ".join(missing) + "\n")
    assert not (tmp_path / "run").exists()


def test_print_config_shows_the_shared_keys_with_their_defaults(core_plugin_host, tmp_path, capsys):
    from mllmkit.cli import main

    path = tmp_path / "good.toml"
    path.write_text(GOOD + '\n[[data.train]]\ntype = "llava_conversations"\nannotations = "a.json"\n')
    assert main(["print-config", str(path), "--set", "model.llm.precision=bf16"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["model"]["vision"] == {"type": "toy_vision", "image_size": 16, "patch_size": 8, "width": 24,
                                          "trainable": False, "precision": "fp32", "gradient_checkpointing": False}
    assert printed["model"]["bridges"][0]["trainable"] is True and printed["model"]["bridges"][0]["precision"] == "fp32"
    assert "gradient_checkpointing" not in printed["model"]["bridges"][0]
    assert printed["model"]["llm"]["precision"] == "bf16"
    assert printed["data"]["train"][0]["weight"] == 1.0


def test_a_component_config_may_not_declare_a_shared_key():
    import attrs

    from mllmkit.registry import ComponentSpec, Registry

    @attrs.frozen(kw_only=True)
    class Declares:
        precision: str = "fp32"

    spec = ComponentSpec("mine", Declares, lambda cfg, ctx: None, "declares precision", dims=lambda cfg, ctx: None)
    with pytest.raises(ValueError) as info:
        Registry().add("bridge", spec, "my-plugin")
    assert str(info.value) == ("my-plugin: bridge component 'mine': its config class declares precision, which the "
                               "core validates and applies for every bridge component; remove them (set different "
                               "defaults with ComponentSpec(defaults=...))")
    with pytest.raises(ValueError, match="defaults names weight; only the shared keys of a bridge component go there "
                                         r"\(trainable, precision, tune, lora\)"):
        Registry().add("bridge", attrs.evolve(spec, config=attrs.make_class("Empty", {}), defaults={"weight": 2.0}),
                       "my-plugin")
