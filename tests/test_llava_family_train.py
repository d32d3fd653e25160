"""The LLaVA-1.5 family at toy size on CPU: CLIP (a tiny Hugging Face folder) → MLP → Qwen (a tiny
random folder, converted to the Qwen2 modules Qwen2.5 loads into; its weights are large enough that
the frozen LLM's output depends on its input, so a projector alone can lower the loss).

Stage 1 trains the projector only, stage 2 starts from stage 1's export (``[model] init_from``) and
trains the LLM too, the way recipes/llava15_qwen25_7b_{pretrain,sft}.toml do; the loss falls in each stage.
Batches mix image samples, a two-image sample and text-only samples.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mllmkit import assemble, load_recipe
from mllmkit.builtin.datasets import LlavaConfig, _build_llava
from mllmkit.data import Collator, SampleEncoder
from mllmkit.interfaces import BuildContext

vision_hf = pytest.importorskip("mllmkit_vision_hf", reason="the vision_hf plugin is not installed")
tiny_qwen = pytest.importorskip("mllmkit_llm_qwen.tiny_folders", reason="the llm_qwen plugin is not installed")

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return vision_hf.write_random_folder(tmp_path_factory.mktemp("clip"), vision_hf.CLIP_TINY, seed=0)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    # without v1's long-context switches (dynamic NTK, log-n past seq_length), which Qwen2.5 does not have
    config = dict(tiny_qwen.LATER_CONFIG, use_dynamic_ntk=False, use_logn_attn=False)
    return tiny_qwen.write_v1_folder(tmp_path_factory.mktemp("qwen"), tiny_qwen.v1_state_dict(), config=config)


def _write_data(folder):
    images = folder / "images"
    images.mkdir()
    records = []
    for name, colour in COLOURS.items():
        Image.new("RGB", (40, 24), colour).save(images / f"{name}.png")
    for i in range(18):
        name = list(COLOURS)[i % 3]
        records.append({"image": f"{name}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                          {"from": "gpt", "value": name}]})
    records.append({"image": ["red.png", "blue.png"],
                    "conversations": [{"from": "human", "value": "<image> then <image>: which is first?"},
                                      {"from": "gpt", "value": "red"}]})
    records += [{"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}] * 5
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json", images


def _recipe(folders, annotations, images, run_dir, **train) -> dict:
    clip_folder, qwen_folder = folders
    return {
        "model": {"vision": {"type": "clip_tiny", "path": str(clip_folder)},
                  "bridges": [{"type": "mlp"}],
                  "llm": {"type": "qwen", "path": str(qwen_folder), "precision": "fp32"}},
        "data": {"train": [{"type": "llava_conversations", "annotations": str(annotations), "images": str(images)}],
                 "augment": False},
        "train": {"output_dir": str(run_dir), "seed": 0, "max_steps": 30, "micro_batch_size": 8, "lr": 5e-2,
                  "warmup_steps": 2, "weight_decay": 0.0, "precision": "fp32", "max_text_len": 256, "log_every": 30,
                  "tensorboard": False, **train},
        "parallel": {"type": "single"},
    }


def _falls(losses: list[float]) -> bool:
    """The last 5 steps' mean loss is at least 5% below the first 5 steps'."""
    head, tail = losses[:5], losses[-5:]
    return sum(tail) / len(tail) < 0.95 * sum(head) / len(head)


@pytest.mark.slow
def test_two_stages_projector_then_llm(plugin_host, clip_folder, qwen_folder, tmp_path):
    from safetensors.torch import load_file

    from mllmkit.train.loop import train

    annotations, images = _write_data(tmp_path)
    stage1 = load_recipe(_recipe((clip_folder, qwen_folder), annotations, images, tmp_path / "stage1"))
    first = train(stage1, tmp_path / "stage1")
    exported = load_file(str(tmp_path / "stage1/export/trainable.safetensors"))
    assert sorted(exported) == ["bridges.0.net.0.bias", "bridges.0.net.0.weight",
                                "bridges.0.net.2.bias", "bridges.0.net.2.weight"]  # the projector only
    assert _falls(first.losses), first.losses

    data = _recipe((clip_folder, qwen_folder), annotations, images, tmp_path / "stage2", lr=3e-3)
    data["model"]["init_from"] = str(tmp_path / "stage1/export")
    data["model"]["llm"]["trainable"] = True
    stage2 = load_recipe(data)
    model = assemble(stage2)
    for name, tensor in exported.items():  # stage 2 starts from stage 1's projector
        torch.testing.assert_close(model.get_parameter(name).detach(), tensor)
    second = train(stage2, tmp_path / "stage2")
    assert _falls(second.losses), second.losses
    assert second.losses[0] < first.losses[0]  # it starts where stage 1 left the projector, not from scratch
    assert "llm.hf_model.model.layers.0.mlp.up_proj.weight" in load_file(
        str(tmp_path / "stage2/export/trainable.safetensors"))
    print(f"stage 1 losses {first.losses}\nstage 2 losses {second.losses}")


def test_text_only_and_image_samples_in_one_batch(plugin_host, clip_folder, qwen_folder, tmp_path):
    """A mixed batch's summed loss is the sum of its samples' losses alone, and the projector gets
    gradient only from the rows with images."""
    annotations, images = _write_data(tmp_path)
    recipe = load_recipe(_recipe((clip_folder, qwen_folder), annotations, images, tmp_path / "run"))
    torch.manual_seed(0)
    model = assemble(recipe)
    dataset = _build_llava(LlavaConfig(annotations=annotations, images=images), BuildContext(key="data"))
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), 256)
    collate = Collator(model.llm.template.pad_token_id)
    samples = [encoder(dataset[i]) for i in (0, 18, 19)]  # one image, two images, text only
    assert [len(s.pixels) for s in samples] == [1, 2, 0]
    batch = collate(samples)
    assert int((batch.input_ids == model.llm.template.image_token_id).sum()) == 3 * model.tokens_per_image == 12
    out = model(**batch.model_inputs("cpu"))
    alone = [model(**collate([s]).model_inputs("cpu")) for s in samples]
    torch.testing.assert_close(out.loss_sum, sum(a.loss_sum for a in alone), atol=1e-4, rtol=1e-5)
    assert int(out.num_tokens) == sum(int(a.num_tokens) for a in alone) == batch.num_tokens
    # text only, LLM frozen: a blank image through the projector, times 0, keeps it in the graph ...
    alone[2].loss_sum.backward()
    assert model.bridges[0].net[0].weight.grad.abs().sum() == 0  # ... with no gradient from text-only rows
    out.loss_sum.backward()
    assert model.bridges[0].net[0].weight.grad.abs().sum() > 0


def test_a_micro_batch_without_images_still_trains_the_projector(plugin_host, clip_folder, qwen_folder, tmp_path):
    """Only the projector trains and no sample has an image: the step runs (the loss had no grad_fn)."""
    from mllmkit.train.loop import train

    text_only = [{"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}] * 4
    (tmp_path / "data.json").write_text(json.dumps(text_only))
    recipe = _recipe((clip_folder, qwen_folder), tmp_path / "data.json", tmp_path, tmp_path / "run", max_steps=2,
                     micro_batch_size=2)
    assert len(train(load_recipe(recipe), tmp_path / "run").losses) == 2
