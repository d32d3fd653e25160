"""``[train] fused_kernels``: "liger" is refused off CUDA with the key and the fix; "none" changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch

from mllmkit.assemble import assemble
from mllmkit.errors import RecipeError
from mllmkit.recipe import load_recipe
from mllmkit.train.fused import apply_fused_kernels


def test_liger_on_the_cpu_is_a_recipe_error_and_none_is_a_no_op(plugin_host, toy_recipe):
    model = assemble(load_recipe(copy.deepcopy(toy_recipe)))
    with pytest.raises(RecipeError, match="'liger' runs Triton kernels on a CUDA GPU, but this run trains on cpu") as info:
        apply_fused_kernels(model, "liger", torch.device("cpu"))
    assert info.value.key == "train.fused_kernels"
    before = [type(m) for m in model.modules()]
    apply_fused_kernels(model, "none", torch.device("cpu"))
    assert [type(m) for m in model.modules()] == before and model.row_loss is None
