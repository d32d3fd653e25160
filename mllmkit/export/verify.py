"""Parity of an exported folder with the mllmkit model it came from, measured with transformers.

:func:`verify_export` loads the folder with the target class its manifest names
(``Blip2ForConditionalGeneration``, ``LlavaForConditionalGeneration``) and ``AutoProcessor`` (no
remote code) and compares, on sample prompts with images: the prompt ids (the processor's chat
template + tokenizer against the project's template), the tokenizer on :data:`CORPUS` (special-token
strings as text on both sides), the pixels, the logits at every position, and 32 greedy tokens
(no stop tokens, so all 32 are compared). The processor is loaded with ``backend="pil"``: its
resize is then the encoder transform's exactly (the default torchvision backend differs by ~1e-2);
the sample pictures are not square, so a pad-to-square or crop step is compared too. In fp32 the
logits must agree to 1e-4 (max abs); in bf16/fp16 they are reported only. Ids and greedy tokens must
be identical in every dtype checked against a threshold.
"""

from __future__ import annotations

import pathlib
from typing import Any

import attrs
import torch

from mllmkit.export.tokenizers import CORPUS
from mllmkit.template import IMAGE_SPAN, encode_pieces

__all__ = ["LOGITS_ATOL", "NEW_TOKENS", "PIXELS_ATOL", "Report", "round_like_export", "sample_images", "verify_export"]

LOGITS_ATOL = 1e-4
PIXELS_ATOL = 1e-6
NEW_TOKENS = 32


@attrs.define
class Report:
    """The figures of one parity check."""

    dtype: str
    device: str
    logits_max_abs: float = 0.0
    pixels_max_abs: float = 0.0
    prompt_ids_equal: bool = True
    corpus_mismatches: list[str] = attrs.Factory(list)
    greedy_equal: bool = True
    greedy_first_difference: int | None = None
    stop_ids_equal: bool = True
    prompts: int = 0

    @property
    def passed(self) -> bool:
        logits_ok = self.dtype != "float32" or self.logits_max_abs <= LOGITS_ATOL
        return (logits_ok and self.pixels_max_abs <= PIXELS_ATOL and self.prompt_ids_equal and not self.corpus_mismatches and self.stop_ids_equal
                and (self.greedy_equal or self.dtype != "float32"))

    def figures(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "passed": self.passed, "logits_atol": LOGITS_ATOL}

    def describe(self) -> str:
        lines = [f"  logits max abs difference: {self.logits_max_abs:.3g} ({self.dtype} on {self.device}; "
                 f"limit {LOGITS_ATOL:g} in float32)",
                 f"  pixels max abs difference (PIL processor vs encoder transform): {self.pixels_max_abs:.3g} "
                 f"(limit {PIXELS_ATOL:g})",
                 f"  prompt ids identical: {self.prompt_ids_equal} ({self.prompts} prompts)",
                 f"  tokenizer corpus: {len(CORPUS) - len(self.corpus_mismatches)}/{len(CORPUS)} texts identical",
                 f"  greedy {NEW_TOKENS} tokens identical: {self.greedy_equal}"
                 + ("" if self.greedy_equal else f" (first difference at token {self.greedy_first_difference})"),
                 f"  generation_config eos = template stop ids: {self.stop_ids_equal}"]
        lines += [f"  corpus text differs: {text}" for text in self.corpus_mismatches]
        return "\n".join(lines)


def sample_images() -> list[Any]:
    """Two deterministic pictures, not square, so the processor's resize is exercised; after a
    shortest-edge resize to 28 px the second (a vertical gradient) has a centre-crop margin of 15 rows,
    whose half torchvision rounds up and transformers down, so a crop offset that differs is measured."""
    from PIL import Image, ImageDraw

    first = Image.new("RGB", (72, 50), (230, 230, 220))
    draw = ImageDraw.Draw(first)
    draw.ellipse((8, 8, 36, 40), fill=(200, 30, 30))
    draw.rectangle((44, 12, 66, 34), fill=(30, 60, 200))
    second = Image.linear_gradient("L").resize((41, 64)).convert("RGB")
    return [first, second]


def _prompts() -> list[tuple[list[dict[str, str]], list[int]]]:
    """(messages, image indices): one image and the default system prompt; a system prompt, two
    images and a finished turn before the question."""
    return [
        ([{"role": "user", "content": IMAGE_SPAN + "What shape is in the image?"}], [0]),
        ([{"role": "system", "content": "Answer briefly."},
          {"role": "user", "content": IMAGE_SPAN + "Describe the picture. 请描述。"},
          {"role": "assistant", "content": "A red circle and a blue square."},
          {"role": "user", "content": IMAGE_SPAN + "And this one?"}], [0, 1]),
    ]


def round_like_export(model, dtype: torch.dtype) -> None:
    """Round every floating parameter of ``model`` through ``dtype`` and keep it in fp32, so the model
    holds exactly the exported values (the export casts every tensor to ``dtype``)."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype).float()


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def verify_export(folder: str | pathlib.Path, model, *, device: str = "cpu", dtype: torch.dtype | None = None) -> Report:
    """Compare the export in ``folder`` with ``model`` (an MLLM holding the exported weights)."""
    import json

    from transformers import AutoProcessor, GenerationConfig

    from mllmkit.export.targets import target_named
    from mllmkit.export.write import MANIFEST
    from mllmkit.generation import generate

    folder = pathlib.Path(folder)
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    report = Report(dtype=str(dtype).removeprefix("torch."), device=device)
    target = target_named(json.loads((folder / MANIFEST).read_text())["target"])
    hf = target.model_class().from_pretrained(folder, dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, backend="pil")  # PIL resize, as the encoder transform
    model.to(device=device, dtype=dtype).eval()
    llm, template, tokenizer = model.llm, model.llm.template, model.llm.tokenizer

    stops = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    for module in hf.modules():  # generate fills an unset eos from these: no stops, all 32 tokens compared
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.eos_token_id = None
    report.stop_ids_equal = list(stops if isinstance(stops, list) else [stops]) == list(template.stop_token_ids)
    for text in CORPUS:
        ids = processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if ids != tokenizer.encode(text):
            report.corpus_mismatches.append(repr(text[:60]))

    transform = model.vision.image_transform(train=False)
    images = sample_images()
    for messages, used in _prompts():
        pictures = [images[i] for i in used]
        ours = encode_pieces(template.pieces(messages, model.tokens_per_image, add_generation_prompt=True)).input_ids
        text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=pictures, text=text, return_tensors="pt")
        report.prompts += 1
        if inputs["input_ids"][0].tolist() != ours:
            report.prompt_ids_equal = False
            continue
        ids = inputs["input_ids"].to(device)
        pixels = torch.stack([transform(p) for p in pictures]).to(device, dtype)
        hf_pixels = inputs["pixel_values"].to(device, dtype)
        report.pixels_max_abs = max(report.pixels_max_abs, float((pixels - hf_pixels).abs().max()))
        theirs = hf(pixel_values=hf_pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        embeds = model.embed(ids, pixels=pixels)
        mine = llm.logits(llm.hidden(embeds)).float()
        report.logits_max_abs = max(report.logits_max_abs, float((mine - theirs).abs().max()))

        config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, bos_token_id=None,
                                  pad_token_id=template.pad_token_id)
        out = hf.generate(pixel_values=hf_pixels, input_ids=ids, attention_mask=torch.ones_like(ids),
                          generation_config=config)[0].tolist()
        hf_tokens = out[ids.shape[1]:] if len(out) > NEW_TOKENS else out
        our_tokens = generate(llm, embeds, max_new_tokens=NEW_TOKENS, stop_token_ids=())
        difference = _first_difference(our_tokens, hf_tokens)
        if difference is not None:
            report.greedy_equal = False
            report.greedy_first_difference = difference
    return report
