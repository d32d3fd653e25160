"""The assembled MLLM as a list of pipeline layers, through the MLLM and LLM interfaces only.

Layer 0 (:class:`EmbedLayer`): vision encoder + bridges + token embedding + image scatter
(``MLLM.embed``); then one :class:`DecoderLayer` per LLM decoder layer (``llm.layers()``, with the
causal mask, positions and rotary embedding recomputed on each stage from the 2-D attention mask);
last (:class:`FinalLayer`): the final norm, holding the head that :class:`LabelledLoss` applies only
at labelled positions. Between stages travel ``(hidden [B,T,H], attention_mask [B,T])``; the labelled
rows and their targets go from the host straight to the last stage. No identity ballast layers, no
dummy trainable layer.

Also here: the helpers that materialise one stage's layers (after a build under
:func:`mllmkit.weights.meta_parameters`) and free the others.
"""

from __future__ import annotations

import torch
from torch import nn

from mllmkit.model import loss_at_rows
from mllmkit_parallel_pipeline.layer_inputs import LayerInputsCache

__all__ = [
    "DecoderLayer",
    "EmbedLayer",
    "FinalLayer",
    "LabelledLoss",
    "materialize_layers",
    "pipeline_layers",
    "release_layers",
]


def _no_reentrant_checkpoint(function, *args):
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


class EmbedLayer(nn.Module):
    """Vision + bridges + token embedding + image scatter: ``(ids, mask, pixels) -> (hidden, mask)``
    (the engine checks the placeholder count on the host before the schedule starts)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision = model.vision
        self.bridges = model.bridges
        self.embedding = model.llm.embedding
        object.__setattr__(self, "mllm", model)  # for MLLM.embed; its parts above are this layer's

    def forward(self, inputs):
        input_ids, attention_mask, pixels = inputs
        hidden = self.mllm.embed(input_ids, pixels=pixels if pixels.shape[0] > 0 else None, checked=True)
        return hidden, attention_mask


class DecoderLayer(nn.Module):
    """One LLM decoder layer; positions, causal mask and rotary embedding come from the stage's
    :class:`LayerInputsCache` (built once per micro-batch on each stage)."""

    def __init__(self, model: nn.Module, index: int, inputs: LayerInputsCache, checkpointing: bool = False) -> None:
        super().__init__()
        self.layer = model.llm.layers()[index]
        self.rotary = model.llm.rotary  # no parameters; every stage needs its buffers
        self.checkpointing = checkpointing
        config = model.llm.hf_model.config
        self.kind = (getattr(config, "layer_types", None) or ["full_attention"] * (index + 1))[index]
        object.__setattr__(self, "inputs", inputs)  # shared by the stage's layers, not a submodule

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask, position_ids, rotary = self.inputs.get(self.kind, hidden, attention_mask)
        out = self.layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, inputs):
        hidden, attention_mask = inputs
        if self.checkpointing and torch.is_grad_enabled():
            hidden = _no_reentrant_checkpoint(self._run, hidden, attention_mask)
        else:
            hidden = self._run(hidden, attention_mask)
        return hidden, attention_mask


class FinalLayer(nn.Module):
    """The final norm; also owns the head (applied by :class:`LabelledLoss` at labelled positions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm = model.llm.norm
        self.head = model.llm.head

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)


class LabelledLoss:
    """``loss_fn(hidden, (rows, targets))``: cross-entropy with the head applied only at the rows whose
    next token is labelled (:func:`mllmkit.model.labelled_rows`, computed from the host's labels, so
    the last stage never waits on its GPU to find them).

    Not a module (DeepSpeed would register it on every stage). In training ``window`` is the core's
    :class:`mllmkit.train.engine.StepWindow`: the loss backpropagated is the micro-batch's share of the
    step's loss, and the window records the loss sums; in evaluation (no window) it is the plain sum.
    """

    def __init__(self, final: FinalLayer) -> None:
        self.final = final
        self.window = None

    def __call__(self, hidden: torch.Tensor, labelled: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, targets = labelled
        loss_sum = loss_at_rows(hidden, rows, targets, self.final.head)
        return loss_sum if self.window is None else self.window.share(loss_sum, targets.numel())


def pipeline_layers(model: nn.Module, checkpointing: bool = False) -> list[nn.Module]:
    """``[EmbedLayer, DecoderLayer × n_layers, FinalLayer]`` over the MLLM's own modules."""
    n = len(model.llm.layers())
    inputs = LayerInputsCache(model.llm.hf_model.config, model.llm.rotary)
    return [EmbedLayer(model), *(DecoderLayer(model, i, inputs, checkpointing) for i in range(n)), FinalLayer(model)]


def _init_(param: torch.Tensor, owner: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        if param.ndim >= 2:
            param.normal_(0.0, 0.02, generator=generator)
        elif "norm" in type(owner).__name__.lower() or "ln" in type(owner).__name__.lower():
            param.fill_(1.0)
        else:
            param.zero_()


def materialize_layers(layers: list[nn.Module], device: torch.device, seed: int) -> int:
    """Give every meta parameter of ``layers`` real storage on ``device`` (random init, N(0, 0.02)
    for matrices, ones for norm weights, zeros otherwise); move the rest there. Returns the count."""
    generator = torch.Generator(device=device).manual_seed(seed)
    count = 0
    for layer in layers:
        for module in layer.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.is_meta:
                    real = torch.empty(param.shape, dtype=param.dtype, device=device)
                    _init_(real, module, generator)
                    setattr(module, name, nn.Parameter(real, requires_grad=param.requires_grad))
                    count += 1
        layer.to(device)
    return count


def release_layers(layers: list[nn.Module], keep: list[nn.Module]) -> int:
    """Replace the parameters and buffers of ``layers`` that ``keep`` does not share by meta tensors
    (frees other stages' weights). Returns the number of tensors released."""
    kept = {id(t) for layer in keep for t in [*layer.parameters(), *layer.buffers()]}
    released = 0
    for layer in layers:
        for module in layer.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if id(param) not in kept and not param.is_meta:
                    setattr(module, name, nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad))
                    released += 1
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and id(buf) not in kept and not buf.is_meta:
                    module._buffers[name] = buf.to("meta")
                    released += 1
    return released
