"""Export pieces that need no transformers model load: key tables both ways, the composition check,
the hook (registration, duplicates), the manifest, the tokenizer conversion and the chat templates."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from mllmkit.cli import main
from mllmkit.errors import UserError
from mllmkit.export.spec import ExportSpec, Table
from mllmkit.export.tokenizers import CORPUS
from mllmkit.registry import DuplicateComponentError
from mllmkit.template import IMAGE_SPAN, encode_pieces

SUPPORTED = ("supported compositions: Blip2ForConditionalGeneration: eva_tiny | eva_vit_g → qformer | qformer_tiny "
             "→ linear → baichuan2 | baichuan2_tiny | qwen; LlavaForConditionalGeneration: clip_tiny | "
             "clip_vit_l14_336 | siglip_so400m_p14_384 | siglip_tiny → mlp → baichuan2 | baichuan2_tiny | qwen")


def _tiny_recipe(**bridge) -> dict:
    return {"model": {"vision": {"type": "eva_tiny"},
                      "bridges": [{"type": "qformer_tiny", "init_std": 0.2}, {"type": "linear", **bridge}],
                      "llm": {"type": "qwen", "preset": "qwen_tiny", "precision": "fp32"}},
            "data": {"train": [{"type": "demo_shapes", "size": 8}]}}


def _model(plugin_host, recipe: dict):
    from mllmkit.chat.loading import load_chat_model

    return load_chat_model(recipe, device="cpu", precision="fp32")


def test_tables_both_ways_on_every_part(plugin_host):
    """Each part's state dict → Blip2 names → back is the identity, and the Blip2 names are exactly
    those of transformers' model for the composed config (checked by the exporter)."""
    from mllmkit.export.compose import compose

    model, recipe = _model(plugin_host, _tiny_recipe())
    composed = compose(model, recipe, plugin_host.registry)
    for spec, (name, part) in zip(composed.specs, model.parts()):
        state = part.state_dict()
        forward = spec.keys.apply(state, name)
        back = spec.reverse.apply(forward, name)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state), name
    eva = model.vision.vit.blocks[0].attn
    fused = composed.tensors["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    assert torch.equal(fused, torch.cat([eva.q_bias, torch.zeros_like(eva.q_bias), eva.v_bias]))
    assert torch.equal(composed.tensors["vision_model.post_layernorm.weight"], model.bridges[0].ln_vision.weight)
    assert composed.config["image_token_index"] == model.llm.template.image_token_id
    assert composed.config["num_query_tokens"] == 8
    assert composed.notes == [
        "vision_config.layer_norm_eps: model.vision (eva_tiny) uses 1e-06 and model.bridges[0] (qformer_tiny) uses "
        "1e-05; Blip2ForConditionalGeneration has one value, 1e-06 is kept (not exactly representable: "
        "model.bridges[0] (qformer_tiny) computes with 1e-06 in the export)"]


def test_reverse_refuses_a_key_bias():
    from mllmkit_vision_eva.export import BLIP2_TO_EVA

    bias = torch.ones(12)
    with pytest.raises(UserError, match="the key part of the bias is not zero; EVA has no key bias"):
        BLIP2_TO_EVA.apply({"vision_model.encoder.layers.0.self_attn.qkv.bias": bias}, "test")


def test_table_names_unmatched_and_colliding_keys():
    table = Table(rules=[(r"a\.(\d)", r"x.\1"), (r"b", "x.1")])
    with pytest.raises(UserError, match=r"no export rule for 1 tensor\(s\): c"):
        table.apply({"a.1": 1, "c": 2}, "src")
    with pytest.raises(UserError, match="two tensors map to 'x.1'"):
        table.apply({"a.1": 1, "b": 2}, "src")


def test_unsupported_composition_lists_the_supported_ones(plugin_host, tmp_path, capsys):
    import tomli_w

    recipe = _tiny_recipe()
    recipe["model"]["bridges"][1]["type"] = "mlp"
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    assert main(["export", str(path), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("mllmkit: error: the model eva_tiny → qformer_tiny → mlp → qwen fills the slots vision_model → "
                   "qformer → multi_modal_projector → language_model, which no transformers class takes; "
                   f"{SUPPORTED}\n")
    assert not (tmp_path / "out").exists()


def test_a_plugin_registers_an_exporter_and_duplicates_are_refused(tmp_path):
    from mllmkit.builtin.export import BLIP2_TO_LINEAR, LINEAR_TO_BLIP2, linear_config
    from mllmkit.export.compose import supported_compositions
    from mllmkit.plugins import build_plugin_host

    class MLPExport:
        name = "mllmkit-test-mlp-export"

        @staticmethod
        def mllmkit_register_exporters() -> list[ExportSpec]:
            return [ExportSpec("mlp_test", "bridge", "language_projection", "test", keys=LINEAR_TO_BLIP2,
                               reverse=BLIP2_TO_LINEAR, config=linear_config)]

    from mllmkit.hookspecs import hookimpl

    hookimpl(MLPExport.mllmkit_register_exporters)
    host = build_plugin_host(extra_plugins=[("test-mlp", MLPExport())])
    assert "linear | mlp_test" in supported_compositions(host.registry)
    assert host.registry.get("export", "mlp_test").distribution == "test-mlp"

    class Duplicate:
        @staticmethod
        def mllmkit_register_exporters() -> list[ExportSpec]:
            return [ExportSpec("linear", "bridge", "language_projection", "again", keys=LINEAR_TO_BLIP2,
                               reverse=BLIP2_TO_LINEAR, config=linear_config)]

    hookimpl(Duplicate.mllmkit_register_exporters)
    with pytest.raises(DuplicateComponentError, match="export component 'linear' is registered twice: by "):
        build_plugin_host(extra_plugins=[("dup", Duplicate())])


def test_manifest_hashes_every_file(plugin_host, tmp_path):
    from mllmkit.export.write import MANIFEST, export_model

    out = tmp_path / "export"
    export_model(_tiny_recipe(), None, out, dtype="fp32", max_shard_size="300KB")
    manifest = json.loads((out / MANIFEST).read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json",
            "model.safetensors.index.json", "mllmkit_recipe.toml"} <= set(files)
    for name in files:
        data = (out / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in files if n.startswith("model-")}
    assert "weights" not in (out / "mllmkit_recipe.toml").read_text()
    assert manifest["dtype"] == "float32" and manifest["notes"]


@pytest.mark.parametrize("which", ["qwen_v1", "baichuan2"])
def test_tokenizer_and_chat_template_match_the_project(plugin_host, tmp_path, which):
    """The converted tokenizer gives the project's ids on the multilingual corpus (special-looking
    strings as text), and the Jinja template renders the training template's prompt."""
    from transformers import PreTrainedTokenizerFast

    from mllmkit.assemble import build

    if which == "qwen_v1":
        from mllmkit_llm_qwen.export import chatml_jinja as jinja
        from mllmkit_llm_qwen.export import hf_tokenizer
        from mllmkit_llm_qwen.tiny_folders import LATER_CONFIG, v1_state_dict, write_v1_folder

        folder = write_v1_folder(tmp_path / "qwen", v1_state_dict(), config={**LATER_CONFIG, "seq_length": 512})
        llm = build("llm", "qwen", path=str(folder), system="Be brief.\n\"Quoted\" 答え")
    else:
        from mllmkit_llm_baichuan.export import baichuan_jinja as jinja
        from mllmkit_llm_baichuan.export import hf_tokenizer
        from mllmkit_llm_baichuan.random_checkpoint import write_folder

        llm = build("llm", "baichuan2", path=str(write_folder(tmp_path / "baichuan")), system="Be brief.")
    converted = hf_tokenizer(llm)
    image = converted.id_to_token(llm.template.image_token_id)
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, chat_template=jinja(llm, image, 4))
    for text in CORPUS:
        assert fast(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            llm.tokenizer.encode(text), text
    conversations = [
        [{"role": "user", "content": IMAGE_SPAN + "What is it?"}],
        [{"role": "system", "content": "Other system."}, {"role": "user", "content": "Hi <Img>"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": IMAGE_SPAN + IMAGE_SPAN + "Both?"}],
    ]
    for messages in conversations:
        for generation in (True, False):
            ours = encode_pieces(llm.template.pieces(messages, 4, add_generation_prompt=generation)).input_ids
            text = fast.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
            assert fast(text, add_special_tokens=False)["input_ids"] == ours
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert fast.apply_chat_template(parts, add_generation_prompt=True, tokenize=False) == \
        fast.apply_chat_template(conversations[0], add_generation_prompt=True, tokenize=False)
