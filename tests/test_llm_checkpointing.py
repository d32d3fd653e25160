"""``gradient_checkpointing`` recomputes the decoder layers of a frozen LLM (which stays in eval mode
while gradients flow through it to the bridge) and leaves the gradients unchanged."""

from __future__ import annotations

import torch

from mllmkit.testing.toy import ToyLLMConfig, build_toy_llm


def _run(llm, embeds: torch.Tensor, grad: bool = True) -> tuple[int, torch.Tensor | None]:
    """MLP forward calls of one step (module hooks do not fire during a checkpoint's recompute)."""
    mlp = type(llm.layers()[0].mlp)
    original, calls = mlp.forward, []
    mlp.forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        x = embeds.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = llm.hidden(x, torch.ones(x.shape[:2], dtype=torch.long))
            if grad:
                out.pow(2).sum().backward()
    finally:
        mlp.forward = original
    return len(calls), x.grad


def test_a_frozen_llm_in_eval_mode_recomputes_its_layers_with_the_same_gradients():
    torch.manual_seed(0)
    llm = build_toy_llm(ToyLLMConfig())
    llm.requires_grad_(False).eval()
    embeds = torch.randn(2, 9, llm.hidden_size)
    plain_calls, plain_grad = _run(llm, embeds)
    llm.gradient_checkpointing(True)
    calls, grad = _run(llm, embeds)
    assert (plain_calls, calls) == (2, 4)  # two layers
    torch.testing.assert_close(grad, plain_grad, rtol=1e-6, atol=1e-7)
    assert _run(llm, embeds, grad=False)[0] == 2  # nothing to recompute without autograd
    llm.gradient_checkpointing(False)
    assert _run(llm, embeds)[0] == 2
