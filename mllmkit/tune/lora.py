"""LoRA adapters on a model part (``tune = "lora"``), built with peft, saved in peft's own layout.

:func:`apply_lora` resolves the part's ``lora.targets`` patterns against its module names (a pattern
that matches nothing, or matches a module LoRA cannot wrap, is a :class:`~mllmkit.errors.RecipeError`
listing the names there are) and injects peft's LoRA layers with ``peft.inject_adapter_in_model``
into the part's module — the LLM's transformers model (``hf_model``), so an adapter written here is
one ``peft.PeftModel.from_pretrained`` loads onto that transformers model as is. :func:`keep_only_adapters_trainable`
is the freeze policy of such a part (the base weights frozen, adapters and peft's ``bias`` choice
trainable). :func:`write_adapters` writes ``adapter_config.json`` + ``adapter_model.safetensors`` per
part from full tensors by MLLM name (what every backend gathers); :func:`merge_adapters` folds them
into the base weights (``merge_and_unload``).
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from mllmkit.errors import RecipeError, UserError

__all__ = ["ADAPTER_DIR", "adapter_root", "adapter_inputs_uncast", "apply_lora", "adapted_parts",
           "keep_only_adapters_trainable", "merge_adapters", "write_adapters"]

ADAPTER_DIR = "adapters"
"""Export sub-folder holding one peft adapter folder per LoRA-tuned part (``adapters/llm``)."""

_WRAPPABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adapter_root(part: nn.Module, kind: str) -> nn.Module:
    """The module adapters go into: an LLM's transformers model (``hf_model``, the LLM contract's), else the part."""
    return part.hf_model if kind == "llm" else part


def _pattern(pattern: str) -> str:
    """A ``targets`` pattern as the regex peft full-matches module names with: the name or a dotted suffix of
    it; ``*`` matches within one name."""
    return r"(?:.*\.)?" + re.escape(pattern).replace(r"\*", r"[^.]*")


def _shape_of(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def _candidates(modules: Mapping[str, nn.Module]) -> str:
    shapes = list(dict.fromkeys(_shape_of(n) for n, m in modules.items() if isinstance(m, _WRAPPABLE)))
    more = f" and {len(shapes) - 30} more" if len(shapes) > 30 else ""
    return ", ".join(shapes[:30]) + more if shapes else "(none)"


def _target_modules(root: nn.Module, targets: list[str], key: str, what: str) -> str | list[str]:
    """peft's ``target_modules`` for ``targets``; refuses patterns that match nothing or unwrappable modules."""
    from transformers import PreTrainedModel

    modules = {n: m for n, m in root.named_modules() if n}
    if "all-linear" in targets:
        if targets != ["all-linear"]:
            raise RecipeError(f"{key}.lora.targets", '"all-linear" stands alone; list either it or module-name patterns')
        head = root.get_output_embeddings() if isinstance(root, PreTrainedModel) else None
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear) and m is not head]
        if not linear:
            raise RecipeError(f"{key}.tune", f'"lora": {what} has no Linear layer for LoRA to wrap (peft wraps Linear, '
                                             f'Embedding and Conv layers); set tune = "full" or "frozen"')
        return "all-linear" if isinstance(root, PreTrainedModel) else linear
    for pattern in targets:
        regex = re.compile(_pattern(pattern))
        hits = [n for n in modules if regex.fullmatch(n)]
        if not hits:
            raise RecipeError(f"{key}.lora.targets", f"{pattern!r} matches no module of {what}; its modules LoRA can "
                                                     f"wrap: {_candidates(modules)}")
        wrong = [n for n in hits if not isinstance(modules[n], _WRAPPABLE)]
        if wrong:
            raise RecipeError(f"{key}.lora.targets", f"{pattern!r} matches {wrong[0]} ({type(modules[wrong[0]]).__name__}), "
                                                     f"which LoRA cannot wrap (peft wraps Linear, Embedding and Conv "
                                                     f"layers); pick among: {_candidates(modules)}")
    return "|".join(f"(?:{_pattern(p)})" for p in targets)


def apply_lora(part: nn.Module, lora, kind: str, key: str, what: str) -> nn.Module:
    """Inject LoRA adapters (``lora``: :class:`mllmkit.recipe.shared.LoraKeys`) into ``part``; returns ``part``."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError(f'{key}.tune = "lora" needs the peft package: pip install "mllmkit[lora]"') from None
    root = adapter_root(part, kind)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                        target_modules=_target_modules(root, list(lora.targets), key, what),
                        task_type="CAUSAL_LM" if kind == "llm" else None)
    name_or_path = getattr(getattr(root, "config", None), "name_or_path", None)
    if name_or_path:
        config.base_model_name_or_path = name_or_path
    try:
        inject_adapter_in_model(config, root)
    except ValueError as exc:  # a module type this peft version cannot wrap
        raise RecipeError(f"{key}.tune", f'"lora": peft cannot wrap {what}: {str(exc).splitlines()[0]}') from None
    keep_only_adapters_trainable(part)
    return part


def _roots(part: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules peft injected adapters into (they carry peft's ``peft_config``), with their names in ``part``."""
    for name, module in part.named_modules():
        if isinstance(getattr(module, "peft_config", None), dict):
            yield name, module


def adapted_parts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(MLLM name of the adapted module, module)`` for every part holding LoRA adapters."""
    for part_name, part in model.parts():
        for name, root in _roots(part):
            yield ".".join(x for x in (part_name, name) if x), root


def keep_only_adapters_trainable(part: nn.Module) -> None:
    """In a part with LoRA adapters only the adapters (and the biases peft's ``bias`` names) train; a part
    without adapters is left as it is."""
    from_roots = list(_roots(part))
    if not from_roots:
        return
    for _, root in from_roots:
        bias = root.peft_config["default"].bias
        for name, param in root.named_parameters():
            trains = "lora_" in name or (bias == "all" and name.endswith(".bias"))
            param.requires_grad_(trains and param.is_floating_point())
        if bias == "lora_only":
            from peft.tuners.lora import LoraLayer

            for module in root.modules():
                if isinstance(module, LoraLayer) and getattr(module.get_base_layer(), "bias", None) is not None:
                    module.get_base_layer().bias.requires_grad_(True)


def adapter_inputs_uncast(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within this context peft does not cast each adapted layer's input to the adapter weights' dtype
    (fp32 masters) — for a forward and backward under autocast, where the adapters' matmuls run in the
    autocast dtype whatever the input's, so the cast only copies every activation of every adapted
    layer (again in recompute) and runs dropout on the fp32 copy; the results are the same. peft's own
    switch (``peft.helpers.disable_input_dtype_casting``); a model without adapters is left alone.
    Outside it (generation without autocast: bf16 inputs, fp32 adapters) peft casts as usual."""
    if not any(True for _ in adapted_parts(model)):
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def write_adapters(export_dir: pathlib.Path, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> list[pathlib.Path]:
    """Write ``<export>/adapters/<part>/`` (peft's ``adapter_config.json`` + ``adapter_model.safetensors``,
    keys as ``PeftModel.save_pretrained`` writes them) for each LoRA-tuned part, from the full trained
    tensors by MLLM name. Returns the folders written."""
    adapted = list(adapted_parts(model))
    if not adapted:
        return []
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    written = []
    for name, root in adapted:
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        state = get_peft_model_state_dict(root, state_dict=own, adapter_name="default")
        folder = pathlib.Path(export_dir) / ADAPTER_DIR / _part_of(name)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in state.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        root.peft_config["default"].save_pretrained(str(folder))
        written.append(folder)
    return written


def _part_of(name: str) -> str:
    """``llm``, ``vision`` or ``bridges.N`` of an MLLM module name."""
    pieces = name.split(".")
    return ".".join(pieces[:2]) if pieces[0] == "bridges" else pieces[0]


@torch.no_grad()
def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every part's LoRA adapters into its base weights (peft's ``merge_and_unload``); returns the parts."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = []
    for name, root in list(adapted_parts(model)):
        for module_name, module in list(root.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge(safe_merge=True)
                parent_name, _, child = module_name.rpartition(".")
                setattr(root.get_submodule(parent_name) if parent_name else root, child, module.get_base_layer())
        del root.peft_config
        merged.append(_part_of(name))
    return merged
