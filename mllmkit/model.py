"""MLLM: vision encoder → bridges → LLM, image-token insertion, loss at labelled positions.

Where an image becomes tokens: :meth:`MLLM.encode_images` (pixels → ``[n_images, Q, hidden]``) and
:meth:`MLLM.embed` (those rows scattered, in order, into the embedding rows of the template's image
placeholder tokens). :meth:`MLLM.forward` computes the summed cross-entropy over labelled tokens
only, applying the LLM head only at those positions (never a ``[B, T, vocab]`` logits tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mllmkit.cuda_graphs import graphed_image_encoder
from mllmkit.errors import UserError
from mllmkit.precision import part_autocast
from mllmkit.template import IGNORE_INDEX

__all__ = ["MLLM", "LossOutput", "ImageTokenMismatch", "labelled_rows", "loss_at_rows", "set_trainable"]


class ImageTokenMismatch(UserError):
    """The batch's image placeholders do not match the number of images given."""


@attrs.frozen
class LossOutput:
    """Summed token loss and the number of labelled tokens it covers (mean = sum / count)."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def loss(self) -> torch.Tensor:
        return self.loss_sum / self.num_tokens.clamp(min=1)


class MLLM(nn.Module):
    """A multimodal LLM composed of parts; ``trainable`` says which parts train (others frozen, eval),
    ``precision`` what the vision encoder and each bridge compute in (``"fp32"`` when not given)."""

    loss_logits: str = "labelled"
    """``[train] loss_logits``: ``"all"`` computes the head at every position, as the seed did."""
    row_loss: Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor] | None = None
    """``[train] fused_kernels``: a fused head + cross-entropy ``(hidden rows, head, targets) -> summed loss``
    used at the labelled rows instead of :func:`loss_at_rows` (:func:`mllmkit.train.fused.apply_fused_kernels`)."""

    def __init__(self, vision: nn.Module, bridges: Sequence[nn.Module], llm: nn.Module,
                 trainable: dict[str, bool] | None = None, precision: dict[str, str] | None = None) -> None:
        super().__init__()
        self.vision = vision
        self.bridges = nn.ModuleList(bridges)
        self.llm = llm
        self.tokens_per_image: int = self._tokens_per_image()
        self.trainable_parts: dict[str, bool] = {"vision": False, "llm": False,
                                                 **{f"bridges.{i}": True for i in range(len(self.bridges))},
                                                 **(trainable or {})}
        self.part_precision: dict[str, str] = dict(precision or {})
        self.apply_freeze_policy()

    def _tokens_per_image(self) -> int:
        tokens = self.vision.num_tokens
        for bridge in self.bridges:
            tokens = bridge.tokens_out(tokens)
        return tokens

    # -- freezing --
    def parts(self) -> Iterator[tuple[str, nn.Module]]:
        yield "vision", self.vision
        for i, bridge in enumerate(self.bridges):
            yield f"bridges.{i}", bridge
        yield "llm", self.llm

    def apply_freeze_policy(self) -> None:
        """Parts train or not as ``trainable_parts`` says (the recipe's ``trainable``); plugins never freeze."""
        for name, part in self.parts():
            set_trainable(part, self.trainable_parts.get(name, False))
        self.train(self.training)

    def train(self, mode: bool = True) -> MLLM:
        super().train(mode)
        for name, part in self.parts():
            if not self.trainable_parts.get(name, False):
                part.eval()  # frozen parts stay in eval mode (no dropout, fixed norms)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- images to tokens --
    def run_part(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        """The vision encoder (``"vision"``) or a bridge (``"bridges.N"``) applied in its declared
        precision, whatever autocast surrounds the call (training's, or none in chat): inputs in fp32
        on the part's device, autocast to its precision (off for fp32; fp16 on CPU runs in fp32)."""
        part = self.get_submodule(name)
        param = next(part.parameters(), None)
        device = param.device if param is not None else inputs.device
        with part_autocast(self.part_precision.get(name, "fp32"), device):
            return part(inputs.to(device=device, dtype=torch.float32))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` → ``[n, tokens_per_image, llm hidden]``, each part in its precision
        (:meth:`run_part`); :meth:`embed` casts the rows to the LLM's embedding dtype. Under
        ``torch.inference_mode`` on CUDA (chat, serving, evaluation) the image path replays a CUDA graph
        captured per pixel shape (:func:`mllmkit.cuda_graphs.graphed_image_encoder`)."""
        param = next(self.vision.parameters(), None)
        if param is not None and param.is_cuda and torch.is_inference_mode_enabled() and not self.training:
            return graphed_image_encoder(self, [self.vision, *self.bridges], self._encode_images,
                                         pixels.to(param.device))
        return self._encode_images(pixels)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable_parts.get("vision", False)):
            feats = self.run_part("vision", pixels)
        for i in range(len(self.bridges)):
            feats = self.run_part(f"bridges.{i}", feats)
        return feats

    def frozen_prefix(self) -> int:
        """How many leading bridges are frozen after a frozen vision encoder (-1: the vision trains)."""
        if self.trainable_parts.get("vision", False):
            return -1
        count = 0
        for i in range(len(self.bridges)):
            if self.trainable_parts.get(f"bridges.{i}", False):
                break
            count += 1
        return count

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The output of the frozen vision encoder and frozen leading bridges (cacheable when the
        images are not augmented): ``encode_images(p) == features_to_embeds(image_features(p))``."""
        prefix = self.frozen_prefix()
        if prefix < 0:
            raise ValueError("image_features needs a frozen vision encoder (its output would change in training)")
        feats = self.run_part("vision", pixels)
        for i in range(prefix):
            feats = self.run_part(f"bridges.{i}", feats)
        return feats

    def features_to_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the bridges after the frozen prefix to :meth:`image_features` output."""
        for i in range(max(self.frozen_prefix(), 0), len(self.bridges)):
            features = self.run_part(f"bridges.{i}", features)
        return features

    def check_image_tokens(self, input_ids: torch.Tensor, n_images: int, count: int | None = None) -> None:
        """Raise :class:`ImageTokenMismatch` unless ``input_ids`` holds ``n_images`` images' placeholders
        (``count``: the placeholders counted by the caller on host ids)."""
        if count is None:
            count = int((input_ids == self.llm.template.image_token_id).sum())
        if count != n_images * self.tokens_per_image:
            raise ImageTokenMismatch(
                f"the batch has {count} image placeholder tokens but {n_images} image(s) × "
                f"{self.tokens_per_image} tokens = {n_images * self.tokens_per_image} image embeddings"
            )

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
              image_embeds: torch.Tensor | None = None, checked: bool = False) -> torch.Tensor:
        """Token embeddings with image placeholder rows replaced by image embeddings, in order.

        ``checked``: the caller ran :meth:`check_image_tokens` already (on host copies of the ids, so
        that a GPU pipeline stage does not wait for its queue to count placeholders)."""
        embeds = self.llm.embed(input_ids)
        if image_embeds is None and pixels is not None and pixels.shape[0] > 0:
            image_embeds = self.encode_images(pixels)
        n_images = 0 if image_embeds is None else image_embeds.shape[0]
        if not checked:
            self.check_image_tokens(input_ids, n_images)
        if n_images == 0:
            if torch.is_grad_enabled() and self._image_path_trains():
                # no image in this micro-batch: one blank image through the image path, added times 0, keeps
                # its trainable parts in the graph (the loss has a grad_fn; DDP and ZeRO-3 see them used)
                size = self.vision.image_size
                blank = self.encode_images(torch.zeros(1, 3, size, size, device=embeds.device))
                return embeds + blank.sum().to(embeds.dtype) * 0
            return embeds
        placeholder = input_ids == self.llm.template.image_token_id
        rows = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(placeholder.unsqueeze(-1), rows)

    def _image_path_trains(self) -> bool:
        return any(trains for name, trains in self.trainable_parts.items() if name != "llm")

    # -- loss --
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None, *,
                image_features: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, image_tokens: int | None = None) -> LossOutput:
        """Summed loss over labelled tokens. ``attention_mask=None`` is right for right-padded rows
        (see ``HFCausalLM.hidden``). What a host computes before the batch reaches the device, so
        that the step waits on no GPU value: ``rows``/``targets`` (:func:`labelled_rows` of host
        labels; then ``labels`` may be left out), ``image_tokens`` (the host count of placeholders),
        ``image_features`` (cached :meth:`image_features` output, instead of pixels)."""
        if image_features is not None:
            image_embeds = self.features_to_embeds(image_features)
        checked = image_tokens is not None
        if checked:
            n_images = image_embeds.shape[0] if image_embeds is not None else 0 if pixels is None else pixels.shape[0]
            self.check_image_tokens(input_ids, n_images, count=image_tokens)
        embeds = self.embed(input_ids, pixels=pixels, image_embeds=image_embeds, checked=checked)
        hidden = self.llm.hidden(embeds, attention_mask=attention_mask, position_ids=position_ids)
        return self.loss_from_hidden(hidden, labels, rows=rows, targets=targets)

    def loss_from_hidden(self, hidden: torch.Tensor, labels: torch.Tensor | None,
                         rows: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> LossOutput:
        """Shifted cross-entropy, the head applied only where the next token is labelled (``rows``,
        ``targets`` of :func:`labelled_rows`, computed here from ``labels`` unless given)."""
        if rows is None or targets is None:
            rows, targets = labelled_rows(labels)
        if self.loss_logits == "all":  # the seed's cost: fp32 logits at every position, then the labelled ones
            logits = self.llm.logits(hidden).float()
            loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).index_select(0, rows), targets,
                                       reduction="sum")
        elif self.row_loss is not None:
            loss_sum = self.row_loss(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), self.llm.head, targets)
        else:
            loss_sum = loss_at_rows(hidden, rows, targets, self.llm.logits)
        return LossOutput(loss_sum=loss_sum, num_tokens=torch.full((), rows.numel(), device=hidden.device))


def set_trainable(part: nn.Module, trainable: bool) -> None:
    """Freeze a part (no gradients, eval mode) or let it train (a part with LoRA adapters: only those): the
    core's, from the recipe."""
    for param in part.parameters():
        param.requires_grad_(trainable and param.is_floating_point())
    if trainable:
        from mllmkit.tune.lora import keep_only_adapters_trainable

        keep_only_adapters_trainable(part)  # tune = "lora": the adapters train, the base weights stay frozen
    part.train(trainable)


def labelled_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the loss is taken: the rows of the flattened ``[B*T, H]`` hidden states whose next token
    is labelled (row-major), and those next tokens. Computed on host labels, it costs a GPU no sync."""
    batch, position = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return batch * labels.shape[1] + position, labels[batch, position + 1]


def loss_at_rows(hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                 head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of ``head`` applied only at ``rows`` of the flattened hidden states."""
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return F.cross_entropy(head(picked).float(), targets, reduction="sum")
