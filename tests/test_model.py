"""MLLM assembly with toy parts: freeze policy, forward/backward, image-token scatter, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mllmkit
from mllmkit.model import ImageTokenMismatch, labelled_rows, loss_at_rows
from mllmkit.template import IGNORE_INDEX, IMAGE_SPAN, encode_pieces


@pytest.fixture
def model(core_plugin_host, toy_recipe):
    torch.manual_seed(0)
    return mllmkit.assemble(mllmkit.load_recipe(toy_recipe))


def _encode(model, messages):
    return encode_pieces(model.llm.template.pieces(messages, model.tokens_per_image))


def test_assembly_wires_widths_and_freezes(model):
    assert model.tokens_per_image == 5
    assert model.bridges[0].in_dim == 24 and model.bridges[0].out_dim == 32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bridges.0.proj.weight", "bridges.0.proj.bias"}
    model.train()
    assert model.bridges[0].training and not model.vision.training and not model.llm.training


def test_forward_backward_only_trainable_get_gradients(model):
    enc = _encode(model, [{"role": "user", "content": IMAGE_SPAN + " colour?"},
                          {"role": "assistant", "content": "red"}])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    out = model(ids, labels, torch.ones_like(ids), pixels=torch.randn(1, 3, 16, 16))
    out.loss.backward()
    assert int(out.num_tokens) == len("red") + 1  # answer bytes + <end>
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"bridges.0.proj.weight", "bridges.0.proj.bias"}


def test_loss_equals_full_logits_cross_entropy(model):
    enc = _encode(model, [{"role": "user", "content": "hi " + IMAGE_SPAN},
                          {"role": "assistant", "content": "blue square"}])
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    pixels = torch.randn(1, 3, 16, 16)
    out = model(ids, labels, torch.ones_like(ids), pixels=pixels)
    with torch.no_grad():
        embeds = model.embed(ids, pixels=pixels)
        logits = model.llm.hf_model(inputs_embeds=embeds).logits
    reference = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)


def test_scatter_puts_each_image_at_its_placeholders_in_order(model):
    """Two samples, three images (two in the first sample): rows land where their markers are."""
    first = _encode(model, [{"role": "user", "content": f"a {IMAGE_SPAN} b {IMAGE_SPAN}"}])
    second = _encode(model, [{"role": "user", "content": f"{IMAGE_SPAN} c"}])
    length = max(len(first.input_ids), len(second.input_ids))
    pad = model.llm.template.pad_token_id
    ids = torch.tensor([e.input_ids + [pad] * (length - len(e.input_ids)) for e in (first, second)])
    image_embeds = torch.arange(3 * model.tokens_per_image * 32, dtype=torch.float32).reshape(3, model.tokens_per_image, 32)
    embeds = model.embed(ids, image_embeds=image_embeds)
    q = model.tokens_per_image
    image_id = model.llm.template.image_token_id
    positions = [(b, t) for b in range(2) for t in range(length) if ids[b, t] == image_id]
    assert len(positions) == 3 * q
    expected_rows = image_embeds.reshape(-1, 32)
    for row, (b, t) in enumerate(positions):
        torch.testing.assert_close(embeds[b, t], expected_rows[row])
    # the first image fills the first sample's first span, the third image the second sample
    first_span = [t for b, t in positions if b == 0][:q]
    torch.testing.assert_close(embeds[0, first_span], image_embeds[0])
    second_sample = [t for b, t in positions if b == 1]
    torch.testing.assert_close(embeds[1, second_sample], image_embeds[2])
    # text rows are untouched token embeddings
    text = ids != image_id
    torch.testing.assert_close(embeds[text], model.llm.embed(ids)[text])


def test_placeholder_count_mismatch_is_a_clear_error(model):
    enc = _encode(model, [{"role": "user", "content": f"{IMAGE_SPAN} {IMAGE_SPAN}"}])
    ids = torch.tensor([enc.input_ids])
    with pytest.raises(ImageTokenMismatch) as info:
        model.embed(ids, pixels=torch.randn(1, 3, 16, 16))
    assert str(info.value) == ("the batch has 10 image placeholder tokens but 1 image(s) × 5 tokens = "
                               "5 image embeddings")


def test_labelled_rows_by_hand():
    x = IGNORE_INDEX
    labels = torch.tensor([[x, 5, x, 7], [x, x, x, 9]])
    rows, targets = labelled_rows(labels)
    # next-token targets at (0, 0), (0, 2), (1, 2) of the [2, 4] grid: flat rows 0, 2, 6
    assert rows.tolist() == [0, 2, 6]
    assert targets.tolist() == [5, 7, 9]
    hidden = torch.randn(2, 4, 3)
    head = torch.nn.Linear(3, 11)
    expected = F.cross_entropy(head(hidden[[0, 0, 1], [0, 2, 2]]), torch.tensor([5, 7, 9]), reduction="sum")
    torch.testing.assert_close(loss_at_rows(hidden, rows, targets, head), expected)


def test_trainable_policy_from_recipe(core_plugin_host, toy_recipe):
    toy_recipe["model"]["vision"]["trainable"] = True
    toy_recipe["model"]["bridges"][0]["trainable"] = False
    model = mllmkit.assemble(mllmkit.load_recipe(toy_recipe))
    names = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"vision"}


def test_build_one_component_by_name(core_plugin_host):
    bridge = mllmkit.build("bridge", "mlp", in_dim=8, out_dim=16)
    assert bridge(torch.randn(2, 3, 8)).shape == (2, 3, 16)
