"""EVA runs as LAVIS runs it, in training and in chat alike: fp16 Linear/Conv weights under fp16
autocast (LayerNorms, softmax and the residual stream fp32). Checked against an independent
computation of LAVIS's ``eva_vit.py`` under CUDA autocast, written out with explicit roundings."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mllmkit.assemble import assemble
from mllmkit.builtin.backends import SingleBackend
from mllmkit.chat import chat_session
from mllmkit.data import Collator, SampleEncoder
from mllmkit.interfaces import Sample
from mllmkit.recipe import load_recipe
from mllmkit.train.optim import build_adamw

HEADS, PATCH, BLOCKS = 4, 14, 2


def _half(t: torch.Tensor) -> torch.Tensor:
    """An fp16 value (kept in float64 for the arithmetic around it)."""
    return t.half().double()


def _single(t: torch.Tensor) -> torch.Tensor:
    return t.float().double()


def _exact(t: torch.Tensor) -> torch.Tensor:
    return t


def lavis_forward(sd: dict, pixels: torch.Tensor, fp16: bool) -> torch.Tensor:
    """LAVIS's ``VisionTransformer.forward_features`` of ``eva_vit.py`` after ``convert_weights_to_fp16``,
    under ``maybe_autocast`` (CUDA fp16 autocast): Conv/Linear take fp16 inputs and give fp16 results,
    softmax and LayerNorm give fp32, adding fp16 to fp32 gives fp32 (``fp16=False``: all exact, float64)."""
    half, single = (_half, _single) if fp16 else (_exact, _exact)
    w = {k: v.double() for k, v in sd.items()}

    def linear(x, weight, bias):
        return half(half(x) @ half(weight).T + half(bias))

    def layer_norm(x, prefix):
        x = single(x)
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return single((x - mean) / torch.sqrt(var + 1e-6) * w[prefix + ".weight"] + w[prefix + ".bias"])

    x = F.conv2d(half(pixels.double()), half(w["patch_embed.proj.weight"]), half(w["patch_embed.proj.bias"]),
                 stride=PATCH)
    x = half(x).flatten(2).transpose(1, 2)
    x = single(torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embed"])
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        batch, tokens, width = x.shape
        h = layer_norm(x, p + "norm1")
        bias = torch.cat([w[p + "attn.q_bias"], torch.zeros(width, dtype=torch.float64), w[p + "attn.v_bias"]])
        qkv = linear(h, w[p + "attn.qkv.weight"], bias)
        q, k, v = (t.reshape(batch, tokens, HEADS, -1).transpose(1, 2) for t in qkv.split(width, dim=-1))
        q = half(q * (width // HEADS) ** -0.5)
        attn = single(torch.softmax(half(q @ k.transpose(-1, -2)), dim=-1))
        out = half(half(attn) @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = single(x + linear(out, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]))
        h = linear(layer_norm(x, p + "norm2"), w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])
        h = half(0.5 * h * (1 + torch.erf(h / math.sqrt(2))))
        x = single(x + linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"]))
    return x


def _recipe(toy_recipe: dict, ckpt, device: str) -> dict:
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["vision"] = {"type": "eva_tiny", "weights": str(ckpt), "precision": "fp16"}
    recipe["train"] = {"precision": "bf16", "device": device}  # the recipe's training autocast: bf16
    return recipe


def _hook(module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    module.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach().cpu(), out.detach().cpu())))
    return seen


def _training_step(recipe: dict, picture: Image.Image, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in and EVA's output of one real training step (the engine's bf16 autocast around it)."""
    loaded = load_recipe(recipe)
    torch.manual_seed(loaded.train.seed)
    model = assemble(loaded)
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), 256)
    sample = encoder(Sample(images=[picture], messages=[{"role": "user", "content": "<ImageHere> what?"},
                                                        {"role": "assistant", "content": "a picture"}]))
    backend = SingleBackend(device)
    backend.setup()
    engine = backend.prepare(model, functools.partial(build_adamw, train=loaded.train), lambda step: 1e-3,
                             loaded.train)
    seen = _hook(engine.model.vision)
    engine.train_step([Collator(model.llm.template.pad_token_id)([sample])])
    return seen[0]


def _chat(recipe: dict, picture: Image.Image, device: str) -> torch.Tensor:
    session = chat_session(recipe, device=device, precision="bf16")
    seen = _hook(session.model.vision)
    session.add_image(picture)
    return seen[0][1]


def _picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))


def test_the_lavis_computation_is_close_to_the_exact_one(tiny_ckpt):
    """The independent computation is itself sane: fp16 roundings move it by ~1e-3 relative."""
    sd = torch.load(tiny_ckpt, weights_only=True)
    pixels = torch.randn(2, 3, 56, 56)
    exact, lavis = lavis_forward(sd, pixels, fp16=False), lavis_forward(sd, pixels, fp16=True)
    relative = float((lavis - exact).norm() / exact.norm())
    assert 1e-5 < relative < 1e-2


def test_fp16_eva_on_cpu_trains_and_chats_identically_in_fp32(plugin_host, toy_recipe, tiny_ckpt):
    """On CPU the fp16 encoder runs in fp32 (an fp16 EVA under CPU bf16 autocast crashed)."""
    recipe, picture = _recipe(toy_recipe, tiny_ckpt, "cpu"), _picture()
    pixels, trained = _training_step(recipe, picture, "cpu")
    torch.testing.assert_close(_chat(recipe, picture, "cpu"), trained, rtol=0, atol=0)
    exact = lavis_forward(torch.load(tiny_ckpt, weights_only=True), pixels, fp16=False)
    torch.testing.assert_close(trained.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fp16_eva_on_gpu_is_lavis_in_training_and_chat(plugin_host, toy_recipe, tiny_ckpt):
    recipe, picture = _recipe(toy_recipe, tiny_ckpt, "cuda"), _picture()
    pixels, trained = _training_step(recipe, picture, "cuda")
    chatted = _chat(recipe, picture, "cuda")
    assert trained.dtype == torch.float32  # the residual stream
    torch.testing.assert_close(chatted, trained, rtol=0, atol=0)
    sd = torch.load(tiny_ckpt, weights_only=True)
    exact, lavis = lavis_forward(sd, pixels, fp16=False), lavis_forward(sd, pixels, fp16=True)
    ours, theirs = float((trained.double() - exact).norm()), float((lavis - exact).norm())
    print(f"error vs fp32 reference: mllmkit {ours:.3e}, LAVIS computation {theirs:.3e}, ratio {ours / theirs:.2f}")
    assert ours <= 1.5 * theirs
