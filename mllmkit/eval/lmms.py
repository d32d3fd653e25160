"""lmms-eval model adapter: ``lmms-eval --model mllmkit --model_args recipe=…,checkpoint=…``.

lmms-eval finds external models through the entry-point group ``lmms_eval.models``; mllmkit's
``pyproject.toml`` points it at :func:`manifest`, which names :class:`MllmkitLMM` (a "simple"
model: lmms-eval hands it the task's text prompt and the document's images). The model loads as
``mllmkit chat`` loads it (recipe or export folder, ``checkpoint``, ``device``, ``precision``;
``system`` and ``batch_size`` optional). ``generate_until`` answers greedily in batches through
:func:`mllmkit.eval.generate.generate_answers` (images as image spans before the text, the LLM's
template and system prompt) and cuts each answer at the request's ``until`` strings;
``loglikelihood`` sums the log-probabilities of the continuation as the assistant's answer
(with the template's end-of-turn token, which the template labels with the answer).
Installed with ``pip install mllmkit[eval]``.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.model import lmms

__all__ = ["MllmkitLMM", "manifest"]


def manifest():
    """The lmms-eval model manifest of ``mllmkit`` (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mllmkit", simple_class_path="mllmkit.eval.lmms.MllmkitLMM")


def _visuals(request_args, task_dict) -> list[Any]:
    _, _, doc_to_visual, doc_id, task, split = request_args
    visuals = doc_to_visual(task_dict[task][split][doc_id]) if doc_to_visual is not None else []
    return [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]


class MllmkitLMM(lmms):
    """An mllmkit model as an lmms-eval model."""

    is_simple = True

    def __init__(self, recipe: str, checkpoint: str | None = None, device: str | None = None,
                 precision: str | None = None, system: str | None = None, batch_size: int | str = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        from mllmkit.chat.loading import load_chat_model
        from mllmkit.data.collate import SampleEncoder

        self.model, self.recipe = load_chat_model(recipe, checkpoint=checkpoint, device=device, precision=precision)
        self.system = system if system is not None else self.recipe.data.system
        self.batch_size = int(batch_size)
        limit = getattr(self.model.llm, "max_positions", None) or 4096
        self.encoder = SampleEncoder(self.model.llm.template, self.model.tokens_per_image,
                                     self.model.vision.image_transform(False), limit, system=self.system)

    def _item(self, request_args, text: str):
        from mllmkit.eval.task import ask

        images = _visuals(request_args, self.task_dict)
        return ask("lmms", text.replace("<image>", "").strip(), images, None)

    def generate_until(self, requests) -> list[str]:
        from mllmkit.eval.generate import generate_answers

        answers: list[str] = []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            texts, _ = generate_answers(self.model, [self._item(request.args, context)], self.encoder,
                                        int(gen_kwargs.get("max_new_tokens", 32)), self.batch_size)
            text = texts[0]
            for stop in until:
                text = text.split(stop)[0] if stop else text
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from mllmkit.interfaces import Sample
        from mllmkit.template import IGNORE_INDEX

        out = []
        for request in requests:
            context, target = request.args[0], request.args[1]
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            continuation = target if isinstance(target, str) else target(doc)
            item = self._item(request.args, context)
            sample = Sample(images=item.images, messages=[*item.messages, {"role": "assistant",
                                                                          "content": continuation}])
            encoded = self.encoder(sample)
            ids = torch.tensor([encoded.input_ids], device=self.model.llm.embedding.weight.device)
            pixels = torch.stack(encoded.pixels).to(ids.device) if encoded.pixels else None
            logits = self.model.llm.logits(self.model.llm.hidden(self.model.embed(ids, pixels=pixels))).float()
            labels = torch.tensor(encoded.labels[1:], device=ids.device)
            rows = (labels != IGNORE_INDEX).nonzero().flatten()
            logprobs = torch.log_softmax(logits[0, :-1][rows], dim=-1)
            wanted = labels[rows]
            score = float(logprobs.gather(-1, wanted[:, None]).sum())
            out.append((score, bool((logprobs.argmax(-1) == wanted).all())))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mllmkit's lmms-eval adapter answers single-round tasks (generate_until)")

