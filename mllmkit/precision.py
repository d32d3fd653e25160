"""What a model part computes in: its declared ``precision``, the same in training, evaluation, chat and export.

LAVIS keeps a frozen EVA's Linear and Conv weights in fp16 (``convert_weights_to_fp16``) and runs it
under fp16 autocast (``Blip2Base.maybe_autocast``), so LayerNorms, softmax and the residual stream stay
fp32. The core does this for every vision encoder and bridge: :func:`layout_for_autocast` stores
Linear/Conv weights and biases in the part's dtype and every other floating tensor in fp32, and
:func:`part_autocast` runs the part under autocast to its precision, overriding the training autocast
around it. fp16 on CPU runs in fp32 (CPU autocast keeps LayerNorm and softmax in fp16, unlike CUDA's,
so it would not be LAVIS's numbers): :func:`effective_precision` says so with a one-line notice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from mllmkit.config import torch_dtype
from mllmkit.errors import UserError

__all__ = ["MATMUL_MODULES", "effective_precision", "layout_for_autocast", "part_autocast", "resolve_device",
           "runs_in_fp32_on"]

logger = logging.getLogger(__name__)

MATMUL_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The modules whose weights LAVIS's ``convert_weights_to_fp16`` casts."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when there is a GPU, else CPU; asking for CUDA without one is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for, but CUDA is not available here; use --device cpu")
    return device


def runs_in_fp32_on(precision: str, device: torch.device | str | None) -> bool:
    """Whether a part declared ``precision`` runs in fp32 on ``device`` (fp16 on CPU does)."""
    return precision == "fp16" and device is not None and torch.device(device).type == "cpu"


def effective_precision(precision: str, device: torch.device | str | None, key: str) -> str:
    """The precision a part runs in on ``device``; fp16 on CPU becomes fp32, with a notice naming ``key``."""
    if runs_in_fp32_on(precision, device):
        logger.warning("%s: precision = \"fp16\" runs in fp32 on CPU", key)
        return "fp32"
    return precision


@torch.no_grad()
def layout_for_autocast(module: nn.Module, dtype: torch.dtype) -> None:
    """Linear/Conv weights and biases in ``dtype``, every other floating parameter and buffer in fp32.

    Works on the meta device (a builder lays a part out before streaming weights into it).
    """
    for sub in module.modules():
        target = dtype if isinstance(sub, MATMUL_MODULES) else torch.float32
        for name, param in sub.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                setattr(sub, name, nn.Parameter(param.detach().to(target), requires_grad=param.requires_grad))
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                sub.register_buffer(name, buf.to(torch.float32), persistent=name not in sub._non_persistent_buffers_set)


@contextlib.contextmanager
def part_autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run a vision encoder or bridge in its ``precision`` on ``device``, whatever autocast surrounds it:
    autocast to fp16/bf16, or autocast off for fp32 (and for fp16 on CPU)."""
    device_type = torch.device(device).type
    if precision == "fp32" or runs_in_fp32_on(precision, device):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        with torch.autocast(device_type, dtype=torch_dtype(precision)):
            yield
