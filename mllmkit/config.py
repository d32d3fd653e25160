"""Helpers for component config classes: the attrs decorator to use and value validators.

A component's options are an attrs class decorated with :func:`config`; validators below raise
errors that the recipe loader reports with the exact key path (``model.llm.dtype``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs

__all__ = ["config", "ConfigValueError", "positive", "non_negative", "between", "Precision", "torch_dtype"]

Precision = Literal["fp32", "fp16", "bf16"]


def config(cls: type) -> type:
    """Decorator for component config classes: frozen, keyword-only attrs classes."""
    return attrs.frozen(kw_only=True)(cls)


class ConfigValueError(ValueError):
    """A config value is out of range; ``recipe_key`` names the option."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.recipe_key = key


def positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not value > 0:
        raise ConfigValueError(attribute.name, f"expected a value > 0, found {value!r}")


def non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value < 0:
        raise ConfigValueError(attribute.name, f"expected a value >= 0, found {value!r}")


def between(low: float, high: float) -> Callable[[Any, attrs.Attribute, Any], None]:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and not low <= value <= high:
            raise ConfigValueError(attribute.name, f"expected a value in [{low}, {high}], found {value!r}")
    return check


def torch_dtype(precision: str):
    """The torch dtype for a ``Precision`` string."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
