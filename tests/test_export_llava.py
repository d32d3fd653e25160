"""Export of the LLaVA-1.5 family → transformers ``LlavaForConditionalGeneration``, at tiny size on CPU.

Each case writes real-layout tiny folders (a CLIP or SigLIP folder as downloaded, a Qwen v1 folder
with ``qwen.tiktoken`` or a Qwen2 folder with ``tokenizer.json`` and tied embeddings) plus a trained
projector checkpoint, runs ``mllmkit export --verify``, then checks the folder independently:
``LlavaForConditionalGeneration`` and ``AutoProcessor`` from transformers (no remote code) against
the mllmkit model loaded by ``mllmkit chat``'s loader: prompt ids, pixels, logits (fp32, 1e-5), 32
greedy tokens, and ``load_export`` back. Then what the export refuses: a chain no transformers class
takes, a part with no export, a projector deeper than Llava's; a CLIP crop with an odd margin verifies.
"""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import save_file

from mllmkit.cli import main
from mllmkit.export.spec import ExportError
from mllmkit.template import IMAGE_SPAN, encode_pieces

pytestmark = pytest.mark.slow

vision_hf = pytest.importorskip("mllmkit_vision_hf", reason="the vision_hf plugin is not installed")
tiny_qwen = pytest.importorskip("mllmkit_llm_qwen.tiny_folders", reason="the llm_qwen plugin is not installed")

SUPPORTED = ("supported compositions: Blip2ForConditionalGeneration: eva_tiny | eva_vit_g → qformer | qformer_tiny "
             "→ linear → baichuan2 | baichuan2_tiny | qwen; LlavaForConditionalGeneration: clip_tiny | "
             "clip_vit_l14_336 | siglip_so400m_p14_384 | siglip_tiny → mlp → baichuan2 | baichuan2_tiny | qwen")


def _qwen_v1(tmp_path) -> str:
    config = dict(tiny_qwen.LATER_CONFIG, use_dynamic_ntk=False, use_logn_attn=False)
    return str(tiny_qwen.write_v1_folder(tmp_path / "Qwen-tiny", tiny_qwen.v1_state_dict(), config=config))


def _qwen2(tmp_path) -> str:
    return str(tiny_qwen.write_qwen2_folder(tmp_path / "Qwen2.5-tiny"))


CASES = {  # vision options, mlp options, LLM folder, Llava's strategy and the tower's layers
    "clip_patch_pad": ({"type": "clip_tiny"}, {}, _qwen_v1, "default", 2),
    "clip_cls_layer1_silu": ({"type": "clip_tiny", "select_feature": "cls_patch", "select_layer": 1},
                             {"activation": "silu"}, _qwen2, "full", 1),
    "siglip_resize": ({"type": "siglip_tiny", "image_aspect": "resize", "select_layer": -1}, {}, _qwen2, "full", 3),
}


def _write(tmp_path, vision: dict, mlp: dict, llm_folder) -> tuple:
    """recipe.toml and a trained projector checkpoint (random at std 0.3, so images move the logits)."""
    import tomli_w

    preset = vision_hf.CLIP_TINY if vision["type"] == "clip_tiny" else vision_hf.SIGLIP_TINY
    folder = vision_hf.write_random_folder(tmp_path / vision["type"], preset, seed=1)
    recipe = {"model": {"vision": {**vision, "path": str(folder)}, "bridges": [{"type": "mlp", **mlp}],
                        "llm": {"type": "qwen", "path": llm_folder(tmp_path), "precision": "fp32"}},
              "data": {"train": [{"type": "demo_shapes", "size": 8}]}, "chat": {"precision": "fp32"}}
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    g = torch.Generator().manual_seed(5)
    shapes = {"bridges.0.net.0.weight": (32, 32), "bridges.0.net.0.bias": (32,),
              "bridges.0.net.2.weight": (32, 32), "bridges.0.net.2.bias": (32,)}
    trained = {name: torch.randn(shape, generator=g) * 0.3 for name, shape in shapes.items()}
    save_file(trained, str(tmp_path / "trainable.safetensors"))
    return path, tmp_path / "trainable.safetensors", trained


def _export(recipe, ckpt, out, *extra: str) -> int:
    return main(["export", str(recipe), "--checkpoint", str(ckpt), "--to", str(out), "--dtype", "fp32", *extra])


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_as_llava_with_parity(plugin_host, tmp_path, capsys, case):
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mllmkit.chat.loading import load_chat_model
    from mllmkit.export import load_export
    from mllmkit.generation import generate

    vision, mlp, llm_folder, strategy, layers = CASES[case]
    recipe, ckpt, trained = _write(tmp_path, vision, mlp, llm_folder)
    out = tmp_path / "export"
    assert _export(recipe, ckpt, out, "--verify") == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: LlavaForConditionalGeneration" in printed
    assert "greedy 32 tokens identical: True" in printed and "pixels max abs difference" in printed

    ours, _ = load_chat_model(recipe, checkpoint=ckpt, device="cpu", precision="fp32")
    assert torch.equal(ours.bridges[0].net[2].weight, trained["bridges.0.net.2.weight"])
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert isinstance(processor, LlavaProcessor)
    config = hf.config
    assert (config.image_token_id, config.image_seq_length) == (ours.llm.template.image_token_id,
                                                                ours.tokens_per_image)
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, strategy)
    assert config.vision_config.num_hidden_layers == layers
    assert config.projector_hidden_act == mlp.get("activation", "gelu")

    image = Image.new("RGB", (60, 44), (20, 160, 90))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    ids = encode_pieces(ours.llm.template.pieces([{"role": "user", "content": IMAGE_SPAN + "What is this?"}],
                                                 ours.tokens_per_image, add_generation_prompt=True)).input_ids
    assert inputs["input_ids"][0].tolist() == ids
    pixels = ours.vision.image_transform(train=False)(image)[None]
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        embeds = ours.embed(inputs["input_ids"], pixels=pixels)
        mine = ours.llm.logits(ours.llm.hidden(embeds))
        assert (theirs - mine).abs().max() <= 1e-5
        # the image matters, and so does the layer Llava reads: the comparison above is not vacuous
        other = ours.llm.logits(ours.llm.hidden(ours.embed(inputs["input_ids"], pixels=-pixels)))
        assert (other - mine).abs().max() > 1e-3
        if layers > 1:
            assert (hf(**inputs, vision_feature_layer=-2).logits - theirs).abs().max() > 1e-3
        hf.generation_config.eos_token_id = None  # else generate stops there: compare all 32
        settings = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None,
                                    pad_token_id=ours.llm.template.pad_token_id)
        hf_tokens = hf.generate(**inputs, generation_config=settings)[0, inputs["input_ids"].shape[1]:].tolist()
    assert hf_tokens == generate(ours.llm, embeds, max_new_tokens=32, stop_token_ids=())

    restored = load_export(out, device="cpu", precision="fp32")
    original = ours.state_dict()
    assert restored.state_dict().keys() == original.keys()
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_a_chain_no_class_takes_is_refused(plugin_host, tmp_path, capsys):
    """CLIP → linear → Qwen: every part exports, but to slots of different classes."""
    recipe, ckpt, _ = _write(tmp_path, {"type": "clip_tiny"}, {}, _qwen_v1)
    recipe.write_text(recipe.read_text().replace('type = "mlp"', 'type = "linear"'))
    capsys.readouterr()  # the folders' progress bars
    assert main(["export", str(recipe), "--to", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "mllmkit: error: the model clip_tiny → linear → qwen fills the slots vision_tower → language_projection → "
        f"language_model, which no transformers class takes; {SUPPORTED}\n")
    assert not (tmp_path / "out").exists()


def test_a_part_without_export_is_named(plugin_host):
    from mllmkit.export.compose import plan_export

    def part(type_: str, key: str):
        return types.SimpleNamespace(type=type_, key=key)

    recipe = types.SimpleNamespace(vision=part("clip_tiny", "model.vision"),
                                   bridges=[part("resampler", "model.bridges[0]")], llm=part("qwen", "model.llm"))
    with pytest.raises(ExportError) as error:
        plan_export(recipe, plugin_host.registry)
    assert str(error.value) == ("model.bridges[0]: 'resampler' has no export to a transformers class (the model is "
                                f"clip_tiny → resampler → qwen); {SUPPORTED}")


def test_a_deeper_projector_is_refused(plugin_host, tmp_path, capsys):
    recipe, _, _ = _write(tmp_path, {"type": "siglip_tiny"}, {"depth": 3}, _qwen2)
    capsys.readouterr()
    assert main(["export", str(recipe), "--to", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "mllmkit: error: the mlp bridge has depth = 3, but LlavaForConditionalGeneration's multi_modal_projector is "
        "Linear → activation → Linear (depth = 2)\n")


def test_a_clip_crop_with_an_odd_margin_exports_and_verifies(plugin_host, tmp_path):
    """CLIP without padding, verify's second picture (41×64 → 28×43, crop margin 4k + 3): the encoder
    crops where transformers' processor does, so the parity check passes and the folder is written."""
    recipe, ckpt, _ = _write(tmp_path, {"type": "clip_tiny", "image_aspect": "resize"}, {}, _qwen_v1)
    out = tmp_path / "export"
    assert _export(recipe, ckpt, out, "--verify") == 0
    assert (out / "config.json").is_file()
