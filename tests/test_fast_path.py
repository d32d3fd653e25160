"""The training step's fast path is exact: padding to a multiple, dropping the attention mask of
right-padded rows (SDPA's causal flash path), host-computed labelled rows and placeholder counts give
the loss of the plain computation; a checkpointed LLM called with its KV cache on trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllmkit.builtin.projection_bridges import LinearBridge
from mllmkit.data import Collator, EncodedSample
from mllmkit.model import MLLM, labelled_rows
from mllmkit.template import IGNORE_INDEX
from mllmkit.testing.toy import ToyLLMConfig, ToyVision, build_toy_llm


def _model() -> MLLM:
    torch.manual_seed(0)
    vision = ToyVision(16, 8, 24)
    llm = build_toy_llm(ToyLLMConfig())
    return MLLM(vision, [LinearBridge(24, llm.hidden_size)], llm, trainable={"llm": True}).train()


def _samples(model: MLLM, lengths=(9, 23, 14)) -> list[EncodedSample]:
    """One image each, then text; the last half of every sample labelled."""
    g = torch.Generator().manual_seed(1)
    image = model.llm.template.image_token_id
    out = []
    for i, n in enumerate(lengths):
        ids = [257] + [image] * model.tokens_per_image + torch.randint(0, 256, (n,), generator=g).tolist()
        labels = [IGNORE_INDEX] * (len(ids) - n // 2) + ids[len(ids) - n // 2:]
        out.append(EncodedSample(ids, labels, [torch.rand(3, 16, 16, generator=g)], "test", i))
    return out


def _reference_loss(model: MLLM, samples: list[EncodedSample]) -> torch.Tensor:
    """Each sample alone, unpadded, full logits: summed cross-entropy over its labelled next tokens."""
    total = torch.zeros(())
    for s in samples:
        ids = torch.tensor([s.input_ids])
        embeds = model.embed(ids, pixels=torch.stack(s.pixels))
        logits = model.llm.hf_model.lm_head(model.llm.hf_model.model(inputs_embeds=embeds).last_hidden_state)
        total = total + F.cross_entropy(logits[0, :-1], torch.tensor(s.labels[1:]), ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total


def test_pad_to_multiple_pads_unlabelled_and_changes_no_loss():
    model = _model()
    samples = _samples(model)
    expected = _reference_loss(model, samples)
    plain = Collator(model.llm.template.pad_token_id)(samples)
    padded = Collator(model.llm.template.pad_token_id, pad_to_multiple=16)(samples)
    longest = max(len(s.input_ids) for s in samples)
    assert plain.input_ids.shape[1] == longest and padded.input_ids.shape[1] == 32 > longest
    assert (padded.labels[:, longest:] == IGNORE_INDEX).all()
    assert (padded.attention_mask.sum(1) == plain.attention_mask.sum(1)).all()
    labelled = sum(sum(1 for x in s.labels[1:] if x != IGNORE_INDEX) for s in samples)
    assert padded.num_tokens == plain.num_tokens == labelled
    for batch in (plain, padded):
        out = model(**batch.model_inputs("cpu"))
        torch.testing.assert_close(out.loss_sum, expected, rtol=1e-6, atol=1e-5)
        assert int(out.num_tokens) == batch.num_tokens


def test_right_padded_rows_need_no_mask_and_attention_runs_causal_without_one(monkeypatch):
    model = _model()
    samples = _samples(model)
    batch = Collator(model.llm.template.pad_token_id, pad_to_multiple=8)(samples)
    assert (batch.attention_mask == 0).any()  # real padding in the batch
    with_mask = model(batch.input_ids, batch.labels, attention_mask=batch.attention_mask, pixels=batch.pixels)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    inputs = batch.model_inputs("cpu")
    assert "attention_mask" not in inputs and "labels" not in inputs
    without = model(**inputs)
    assert calls and all(mask is None and causal is True for mask, causal in calls)  # the flash-eligible call
    torch.testing.assert_close(without.loss_sum, with_mask.loss_sum, rtol=1e-6, atol=1e-5)
    bridge = list(model.bridges[0].parameters())
    for a, b in zip(torch.autograd.grad(without.loss_sum, bridge), torch.autograd.grad(with_mask.loss_sum, bridge)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_left_padded_rows_keep_their_mask():
    """The mask-free path applies only without a mask: a left-padded row with its mask (and positions)
    gives the real tokens the hidden states of the unpadded row."""
    llm = _model().llm.eval()
    embeds = torch.randn(1, 7, llm.hidden_size)
    alone = llm.hidden(embeds)
    padded = torch.cat([torch.randn(1, 3, llm.hidden_size), embeds], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    positions = torch.tensor([[0, 0, 0, *range(7)]])
    out = llm.hidden(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_model_inputs_carry_host_rows_and_placeholder_count():
    model = _model()
    samples = _samples(model)
    batch = Collator(model.llm.template.pad_token_id, image_token_id=model.llm.template.image_token_id)(samples)
    rows, targets = labelled_rows(batch.labels)
    inputs = batch.model_inputs("cpu")
    assert torch.equal(inputs["rows"], rows) and torch.equal(inputs["targets"], targets)
    assert inputs["image_tokens"] == len(samples) * model.tokens_per_image
    assert batch.image_keys == (("test", 0, 0), ("test", 1, 0), ("test", 2, 0))
    from mllmkit.model import ImageTokenMismatch

    with pytest.raises(ImageTokenMismatch, match="the batch has 4 image placeholder tokens but 3 image"):
        model(**{**inputs, "image_tokens": 4})


def test_a_checkpointed_llm_called_with_its_cache_on_trains_with_unchanged_gradients():
    """The seed's call, ``hf_model(inputs_embeds, attention_mask, labels)``, leaves the KV cache on;
    with the decoder layers checkpointed, each recompute appended its keys again (2T keys against a
    T-wide padding mask: a RuntimeError in backward)."""
    llm = _model().llm
    hf = llm.hf_model
    embeds = torch.randn(2, 9, llm.hidden_size)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    labels = torch.randint(0, 256, (2, 9)).masked_fill(mask == 0, IGNORE_INDEX)
    grads = []
    for checkpointing in (False, True):
        llm.gradient_checkpointing(checkpointing)
        x = embeds.clone().requires_grad_(True)
        out = hf(inputs_embeds=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append(x.grad)
    llm.gradient_checkpointing(False)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_pinned_batch_copies_to_the_gpu():
    model = _model()
    batch = Collator(model.llm.template.pad_token_id)(_samples(model)).pin_memory()
    assert batch.input_ids.is_pinned() and batch.pixels.is_pinned() and batch.loss_rows[0].is_pinned()
    inputs = batch.model_inputs("cuda")
    assert inputs["input_ids"].is_cuda and torch.equal(inputs["rows"].cpu(), batch.loss_rows[0])
