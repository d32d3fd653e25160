"""Fused training kernels (``[train] fused_kernels = "liger"``), from liger-kernel, on CUDA only.

liger-kernel's Triton kernels replace the LLM's RMSNorm, rotary embedding and SwiGLU MLP in place
(its own ``_apply_liger_kernel_to_instance``, by the transformers ``model_type``), and the loss at
labelled rows becomes its fused linear + cross-entropy, which never materialises the logits of the
rows. Triton kernels need a GPU: on any other device the option is refused with a recipe error
naming the key, and a model type liger does not know is refused too (nothing is silently left
unfused).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mllmkit.errors import RecipeError

__all__ = ["apply_fused_kernels", "liger_row_loss"]


def _import_liger():
    try:
        from liger_kernel.transformers import monkey_patch
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise RecipeError("train.fused_kernels", "'liger' needs liger-kernel; pip install 'mllmkit[liger]' "
                          "(or set fused_kernels = \"none\")") from None
    return monkey_patch, LigerFusedLinearCrossEntropyLoss


def liger_row_loss(loss_cls) -> Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]:
    """``(hidden rows [N, H], head, targets [N]) -> summed cross-entropy`` through liger's fused kernel."""
    fused = loss_cls(reduction="sum")

    def row_loss(picked: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
        return fused(head.weight, picked, targets, getattr(head, "bias", None))

    return row_loss


def apply_fused_kernels(model: nn.Module, kind: str, device: torch.device) -> None:
    """Patch ``model`` (an MLLM whose LLM wraps a transformers model) with ``kind``'s kernels."""
    if kind == "none":
        return
    if device.type != "cuda":
        raise RecipeError("train.fused_kernels", f"'liger' runs Triton kernels on a CUDA GPU, but this run trains "
                          f"on {device.type}; set fused_kernels = \"none\"")
    monkey_patch, loss_cls = _import_liger()
    hf_model = model.llm.hf_model
    model_type = hf_model.config.model_type
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise RecipeError("train.fused_kernels", f"liger-kernel has no kernels for model type {model_type!r}; "
                          f"set fused_kernels = \"none\"")
    monkey_patch._apply_liger_kernel_to_instance(model=hf_model, rope=True, rms_norm=True, swiglu=True,
                                                 cross_entropy=False, fused_linear_cross_entropy=False)
    model.row_loss = liger_row_loss(loss_cls)
