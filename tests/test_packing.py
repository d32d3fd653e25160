"""Packing (``[data] packing``): plans, rows, and training that equals unpacked training.

The plan packs whole draws under the token budget, deterministically; a packed row restarts its
positions per sample, never splits an image span and ignores each sample's first label; one step on
packed rows gives the loss and gradients of the same samples unpacked (fp32, tiny model). The DDP
test runs ``train`` packed on 2 gloo processes and replays its plan unpacked on one process.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import subprocess
import sys

import pytest
import torch

from mllmkit.assemble import assemble
from mllmkit.builtin.backends import SingleBackend
from mllmkit.builtin.demo_shapes import DemoShapes
from mllmkit.data import Collator, EncodedDataset, SampleEncoder
from mllmkit.data.packing import (
    PackingCollator,
    TokenLengths,
    pack_draws,
    packed_position_ids,
    steps_per_packed_epoch,
)
from mllmkit.data.sampling import epoch_order, rank_step
from mllmkit.errors import RecipeError
from mllmkit.hf_llm import PackingUnsupported
from mllmkit.model import labelled_rows
from mllmkit.recipe import load_recipe
from mllmkit.template import IGNORE_INDEX
from mllmkit.train.dist import free_port
from mllmkit.train.optim import build_adamw


def _order(n: int, seed: int = 3) -> list[tuple[int, int, int]]:
    return epoch_order([n], [1.0], seed=seed, epoch=0)


def test_pack_draws_keeps_every_draw_once_under_the_budget_and_is_deterministic():
    order = _order(200)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 120, (len(order),), generator=generator).tolist()
    length_of = {draw: n for draw, n in zip(order, lengths)}
    bins = pack_draws(order, lengths, capacity=300, window=64)
    assert bins == pack_draws(order, lengths, capacity=300, window=64)
    assert sorted(d for b in bins for d in b) == sorted(order)
    assert all(sum(length_of[d] for d in b) <= 300 for b in bins)
    # windows keep the epoch's shuffle: each bin's draws come from one window of 64 draws
    position = {draw: k for k, draw in enumerate(order)}
    assert all(len({position[d] // 64 for d in b}) == 1 for b in bins)
    # best-fit decreasing fills rows: fewer rows than 1.2 × the token lower bound per window
    lower = sum(-(-sum(lengths[i:i + 64]) // 300) for i in range(0, len(order), 64))
    assert len(bins) <= 1.2 * lower
    assert pack_draws(order, lengths, capacity=300, window=64) != pack_draws(_order(200, seed=4), lengths, 300, 64)


def test_a_draw_longer_than_the_budget_gets_a_row_of_its_own():
    order = _order(3)
    assert sorted(map(len, pack_draws(order, [500, 10, 10], capacity=100))) == [1, 2]


def test_steps_per_packed_epoch_takes_the_fewest_of_the_epochs_reached():
    steps = {0: 10, 1: 9, 2: 8, 3: 1}
    assert steps_per_packed_epoch(steps.__getitem__, epochs=3, max_steps=None) == 8
    assert steps_per_packed_epoch(steps.__getitem__, epochs=99, max_steps=10) == 10  # one epoch is enough
    assert steps_per_packed_epoch(steps.__getitem__, epochs=99, max_steps=18) == 9  # epochs 0-1: 9 steps each
    assert steps_per_packed_epoch(steps.__getitem__, epochs=99, max_steps=19) == 8  # epochs 0-2 reached


def test_position_ids_restart_per_sample_and_for_the_padding():
    assert packed_position_ids([3, 2], 8).tolist() == [0, 1, 2, 0, 1, 0, 1, 2]


def _encoder(model, max_len: int = 128) -> SampleEncoder:
    return SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), max_len)


def _model(toy_recipe, trainable_llm: bool = True, **train):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["llm"]["trainable"] = trainable_llm
    recipe["train"] = {"precision": "fp32", "lr": 1e-2, "grad_clip": 1.0, **train}
    loaded = load_recipe(recipe)
    torch.manual_seed(0)
    return loaded, assemble(loaded)


def test_a_packed_row_never_splits_an_image_span_and_ignores_each_first_label(plugin_host, toy_recipe):
    _, model = _model(toy_recipe)
    encoder = _encoder(model)
    samples = [encoder(DemoShapes(size=5, image_size=16, questions_per_image=2)[i]) for i in range(5)]
    template = model.llm.template
    batch = PackingCollator(template.pad_token_id, pad_to_multiple=16, image_token_id=template.image_token_id)(samples)
    lengths = [len(s.input_ids) for s in samples]
    assert batch.input_ids.shape == (1, -(-sum(lengths) // 16) * 16) and batch.size == 5
    positions = batch.position_ids[0].tolist()
    starts = [sum(lengths[:k]) for k in range(5)]
    for start, sample in zip(starts, samples):
        n = len(sample.input_ids)
        assert positions[start:start + n] == list(range(n))
        assert batch.input_ids[0, start:start + n].tolist() == sample.input_ids
        assert batch.labels[0, start] == IGNORE_INDEX
        assert batch.labels[0, start + 1:start + n].tolist() == sample.labels[1:]
    # each image's placeholders are one run inside one sample (positions rise by one along the run)
    ids = batch.input_ids[0].tolist()
    runs, run = [], []
    for k, token in enumerate(ids):
        if token == template.image_token_id:
            run.append(k)
        elif run:
            runs.append(run)
            run = []
    assert len(runs) == 5 and all(len(r) == model.tokens_per_image for r in runs)
    assert all(positions[r[-1]] - positions[r[0]] == len(r) - 1 for r in runs)
    assert batch.image_tokens == 5 * model.tokens_per_image and batch.pixels.shape[0] == 5
    # the loss is taken where the unpacked rows take it, and nowhere across a boundary
    expected = sorted((start + int(r), int(t)) for start, s in zip(starts, samples)
                      for r, t in zip(*labelled_rows(torch.tensor([s.labels]))))
    rows, targets = batch.loss_rows
    assert sorted(zip(rows.tolist(), targets.tolist())) == expected
    assert batch.num_tokens == sum(Collator(template.pad_token_id)([s]).num_tokens for s in samples)


def _engine(loaded, model):
    backend = SingleBackend("cpu")
    backend.setup()
    engine = backend.prepare(model, functools.partial(build_adamw, train=loaded.train), lambda step: 1e-2,
                             loaded.train)
    grads = []
    step = engine.runner.optimizer.step

    def recording_step(*args, **kwargs):
        grads.append([p.grad.detach().clone() for p in engine.model.trainable_parameters()])
        return step(*args, **kwargs)

    engine.runner.optimizer.step = recording_step
    return engine, grads


@pytest.mark.parametrize("trainable_llm", [True, False])
def test_packed_training_gives_the_losses_and_gradients_of_unpacked_training(plugin_host, toy_recipe, trainable_llm):
    packed_engine, packed_grads = _engine(*_model(toy_recipe, trainable_llm))
    plain_engine, plain_grads = _engine(*_model(toy_recipe, trainable_llm))
    encoder = _encoder(packed_engine.model)
    data = DemoShapes(size=12, image_size=16, questions_per_image=2)
    samples = [encoder(data[i]) for i in range(12)]
    assert len({len(s.input_ids) for s in samples}) > 1
    template = packed_engine.model.llm.template
    pack = PackingCollator(template.pad_token_id, pad_to_multiple=8, image_token_id=template.image_token_id)
    plain = Collator(template.pad_token_id, image_token_id=template.image_token_id)
    for step in range(2):  # two steps: the second runs on updated weights
        mine = samples[6 * step:6 * step + 6]
        out_packed = packed_engine.train_step([pack(mine[:4]), pack(mine[4:])])
        out_plain = plain_engine.train_step([plain(mine[:3]), plain(mine[3:])])
        assert out_packed["loss"] == pytest.approx(out_plain["loss"], abs=1e-6)
        assert out_packed["tokens"] == out_plain["tokens"] and out_packed["samples"] == out_plain["samples"] == 6
        diffs = [float((a - b).abs().max()) for a, b in zip(packed_grads[step], plain_grads[step])]
        assert max(diffs) < 1e-5
    assert len(packed_grads[0]) == len(list(packed_engine.model.trainable_parameters())) > 0


def test_a_kernel_without_a_per_sample_mask_is_refused(plugin_host, toy_recipe):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("unmasked_test_kernel", sdpa_attention_forward)
    _, model = _model(toy_recipe)
    model.llm.hf_model.config._attn_implementation = "unmasked_test_kernel"
    embeds = torch.zeros(1, 4, model.llm.hidden_size)
    with pytest.raises(PackingUnsupported, match="'unmasked_test_kernel' has no per-sample mask in transformers"):
        model.llm.hidden(embeds, position_ids=torch.tensor([[0, 1, 0, 1]]))


@pytest.mark.parametrize("data, train, key, message", [
    ({"packing": True}, {}, "data.max_tokens_per_batch", "data.packing = true needs the tokens per packed row"),
    ({"packing": True, "max_tokens_per_batch": 64}, {"max_text_len": 128}, "data.max_tokens_per_batch",
     "expected at least train.max_text_len = 128 (a sample is never split), found 64"),
    ({"packing": True, "max_tokens_per_batch": 512}, {"micro_batch_size": 2}, "train.micro_batch_size",
     "set micro_batch_size = 1, found 2"),
    ({"packing": True, "max_tokens_per_batch": 512}, {"loss_reduction": "sample"}, "train.loss_reduction",
     "use loss_reduction = 'token' with data.packing = true"),
])
def test_settings_packing_cannot_honour_are_recipe_errors(plugin_host, toy_recipe, tmp_path, data, train, key,
                                                          message):
    from mllmkit.train.loop import train as run

    recipe = copy.deepcopy(toy_recipe)
    recipe["data"] = {"train": [{"type": "demo_shapes", "size": 8, "image_size": 16}], **data}
    recipe["train"] = {"precision": "fp32", "max_steps": 1, "tensorboard": False, "device": "cpu", **train}
    with pytest.raises(RecipeError, match=re.escape(message)) as info:
        run(load_recipe(recipe), tmp_path / "run")
    assert info.value.key == key


def test_token_lengths_are_the_encoded_lengths_and_a_refused_record_counts_zero(plugin_host, toy_recipe):
    _, model = _model(toy_recipe)
    data = DemoShapes(size=4, image_size=16)
    encoder = _encoder(model)
    lengths = TokenLengths(EncodedDataset([data], encoder))
    assert [lengths(0, i) for i in range(4)] == [len(encoder(data[i]).input_ids) for i in range(4)]
    short = TokenLengths(EncodedDataset([data], _encoder(model, max_len=8)))
    assert short(0, 0) == 0


SCRIPT = '''
import json, sys
from mllmkit.plugins import build_plugin_host, reset_plugin_host
from mllmkit.testing.toy import ToyPlugin
from mllmkit.recipe import load_recipe
from mllmkit.train.loop import train

reset_plugin_host(build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin())]))
result = train(load_recipe(json.loads(sys.argv[1])), sys.argv[2])
if result.export_dir is not None:
    (result.run_dir / "result.json").write_text(json.dumps({"losses": result.losses}))
'''


@pytest.mark.slow
def test_packed_ddp_training_equals_its_plan_replayed_unpacked(plugin_host, toy_recipe, tmp_path):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["llm"]["trainable"] = True
    recipe["data"] = {"train": [{"type": "demo_shapes", "size": 24, "image_size": 16, "questions_per_image": 2}],
                      "packing": True, "max_tokens_per_batch": 256, "augment": False}
    recipe["train"] = {"precision": "fp32", "lr": 5e-3, "micro_batch_size": 1, "grad_accum": 1, "max_text_len": 128,
                       "max_steps": 3, "warmup_steps": 1, "log_every": 1, "tensorboard": False, "device": "cpu",
                       "seed": 5}
    recipe["parallel"] = {"type": "ddp", "timeout_s": 60}
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(script), json.dumps(recipe),
                           str(tmp_path / "ddp")], env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    packed_losses = json.loads((tmp_path / "ddp/result.json").read_text())["losses"]

    # the same plan, unpacked, on one process: every step's samples, one micro-batch each
    loaded = load_recipe(recipe)
    torch.manual_seed(loaded.train.seed)
    model = assemble(loaded)
    engine, _ = _engine(loaded, model)
    from mllmkit.train.optim import make_lr_schedule

    engine.lr_schedule = make_lr_schedule(loaded.train, 3)
    data = DemoShapes(size=24, image_size=16, questions_per_image=2)
    samples = EncodedDataset([data], SampleEncoder(model.llm.template, model.tokens_per_image,
                                                   model.vision.image_transform(False), 128))
    lengths = TokenLengths(samples)
    order = epoch_order([24], [1.0], loaded.train.seed, 0)
    rows = pack_draws(order, [lengths(d, i) for d, i, _ in order], 256)
    assert any(len(r) > 1 for r in rows[:6])
    plain = Collator(model.llm.template.pad_token_id, image_token_id=model.llm.template.image_token_id)
    replayed = []
    for step in range(3):
        draws = [d for rank in (0, 1) for row in rank_step(rows, step, 1, 2, rank) for d in row]
        replayed.append(engine.train_step([plain([samples[d]]) for d in draws])["loss"])
    assert packed_losses == pytest.approx(replayed, abs=1e-6)
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "ddp/export/trainable.safetensors"))
    mine = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert exported.keys() == mine.keys()
    assert max(float((exported[k] - mine[k]).abs().max()) for k in mine) < 1e-5
