"""Building under ``meta_parameters``: random-init parameters take no memory, loaded weights stay real."""

from __future__ import annotations

import torch
from torch import nn

from mllmkit.weights import KeyMap, load_into, meta_parameters, real_parameters


def test_registered_parameters_go_to_meta_and_buffers_stay():
    with meta_parameters():
        layer = nn.LayerNorm(4)
        layer.register_buffer("scale", torch.ones(2))
    assert layer.weight.is_meta and layer.bias.is_meta
    assert not layer.scale.is_meta
    assert not nn.Linear(2, 2).weight.is_meta  # the patch ends with the context


def test_loaded_and_explicitly_real_parameters_stay_real():
    source = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([5.0, 7.0])}
    with meta_parameters():
        linear = nn.Linear(3, 2)
        load_into(linear, [list(source.items())], KeyMap(rules=[(r"w", "weight"), (r"b", "bias")]), source="mem")
        other = nn.Linear(3, 2)
        with real_parameters():
            other.weight = linear.weight  # a tie of a loaded tensor
    assert other.weight is linear.weight and other.bias.is_meta
    torch.testing.assert_close(linear.weight, source["w"])
    torch.testing.assert_close(linear(torch.ones(1, 3)), torch.tensor([[8.0, 19.0]]))
