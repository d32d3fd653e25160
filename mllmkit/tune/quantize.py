"""QLoRA: an LLM's frozen Linear layers held 4-bit (NF4) or 8-bit by bitsandbytes, on CUDA only.

:func:`quantize_llm` replaces every Linear layer of the LLM's transformers model but its output head
with bitsandbytes' ``Linear4bit`` (``quant_type="nf4"``, compute in the LLM's precision) or
``Linear8bitLt`` (no fp16 weight copy) and moves the LLM to the GPU, where bitsandbytes quantizes the
weights; peft then wraps those layers with LoRA adapters. :func:`check_quantize_device` refuses a CPU
run at check time (bitsandbytes' kernels need CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from mllmkit.errors import RecipeError, UserError

__all__ = ["check_quantize_device", "quantize_llm"]


def check_quantize_device(device: str | torch.device | None, key: str) -> None:
    """``quantize`` needs a CUDA device: refuse ``cpu`` (and ``auto`` on a machine without a GPU)."""
    kind = torch.device(device).type if device not in (None, "auto") else (
        "cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        raise RecipeError(f"{key}.quantize", 'QLoRA quantizes with bitsandbytes on CUDA, and this runs on the CPU; '
                                             'set quantize = "none" (plain LoRA) or train on a GPU (train.device = '
                                             '"cuda")')


@torch.no_grad()
def quantize_llm(part: nn.Module, mode: str, device: torch.device | None, key: str) -> None:
    """Quantize the LLM part's Linear layers in place (``mode``: ``nf4`` or ``int8``) onto ``device``."""
    check_quantize_device(device, key)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f'{key}.quantize = "{mode}" needs the bitsandbytes package: pip install "mllmkit[qlora]"') \
            from None
    root = part.hf_model
    head = root.get_output_embeddings()
    compute = next(root.parameters()).dtype
    for name, module in list(root.named_modules()):
        if not isinstance(module, nn.Linear) or module is head:
            continue
        bias = module.bias is not None
        if mode == "nf4":
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias, compute_dtype=compute,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        else:
            new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias, has_fp16_weights=False,
                                      device="meta")
            new.weight = bnb.nn.Int8Params(module.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        if bias:
            new.bias = nn.Parameter(module.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
    part.to(device)  # bitsandbytes quantizes as the weights reach the GPU
