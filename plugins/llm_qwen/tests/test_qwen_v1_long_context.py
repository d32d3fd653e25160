"""Qwen v1 past ``seq_length`` (dynamic NTK rotary, log-n query scaling) against the v1 formulas written
out independently below, at tiny size (``seq_length`` 24): without a cache, with transformers' dynamic
cache, through mllmkit's static-cache decoder and a chat session; per-row alpha in a padded batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mllmkit_llm_qwen.tiny_folders import HEADS, HIDDEN, LATER_CONFIG, LAYERS, SEQ, write_v1_folder

import mllmkit
from mllmkit.generation import generate
from mllmkit.hf_llm import cache_keyword

D = HIDDEN // HEADS
BASE = 5000.0  # rotary_emb_base of the tiny configs


def reference_alpha(length: int, seq_length: int = SEQ) -> int:
    """v1's ``max(2 ** ceil(log2(n / S) + 1) - 1, 1)`` in integers: 2^(m+1) - 1 for the least m >= 0
    with S * 2^m >= n."""
    m = 0
    while seq_length * 2 ** m < length:
        m += 1
    return 2 ** (m + 1) - 1


class V1Reference:
    """Qwen v1's forward in float64 as ``modeling_qwen.py`` computes it: a forward without past keys
    picks alpha from its length, cached forwards keep it; rotary base ``BASE * alpha^(d/(d-2))``; the
    rotated query at 1-based position p scaled by ``max(log_S(p), 1)``; neither in training."""

    def __init__(self, sd: dict[str, torch.Tensor], training: bool = False) -> None:
        self.w = {k: v.double() for k, v in sd.items()}
        self.training = training
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.alpha = 1

    def __call__(self, ids: torch.Tensor, *, use_cache: bool = False) -> torch.Tensor:
        """Logits ``[T, vocab]`` of ``ids [T]`` after the cached tokens (none unless ``use_cache``)."""
        w, T = self.w, ids.shape[0]
        past = self.keys[0].shape[1] if use_cache and self.keys else 0
        if past == 0:
            self.keys, self.values = [], []
            self.alpha = 1 if self.training else reference_alpha(T)
        inv = 1.0 / ((BASE * self.alpha ** (D / (D - 2))) ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
        pos = torch.arange(past, past + T, dtype=torch.float64)
        emb = torch.cat([torch.outer(pos, inv)] * 2, dim=-1)
        cos, sin = emb.cos(), emb.sin()
        logn = torch.ones(T, dtype=torch.float64) if self.training else (torch.log(pos + 1) / math.log(SEQ)).clamp(min=1)
        mask = torch.arange(past + T)[None, :] > torch.arange(past, past + T)[:, None]

        def rms(x, g):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g

        def rotate(x):
            a, b = x.chunk(2, dim=-1)
            return x * cos + torch.cat([-b, a], dim=-1) * sin

        x = w["transformer.wte.weight"][ids]
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            qkv = rms(x, w[p + "ln_1.weight"]) @ w[p + "attn.c_attn.weight"].T + w[p + "attn.c_attn.bias"]
            q, k, v = (t.reshape(T, HEADS, D).transpose(0, 1) for t in qkv.split(HIDDEN, dim=-1))
            q, k = rotate(q) * logn[:, None], rotate(k)
            if past:
                k, v = torch.cat([self.keys[i], k], dim=1), torch.cat([self.values[i], v], dim=1)
                self.keys[i], self.values[i] = k, v
            else:
                self.keys.append(k)
                self.values.append(v)
            att = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(mask, float("-inf")), dim=-1)
            x = x + (att @ v).transpose(0, 1).reshape(T, HIDDEN) @ w[p + "attn.c_proj.weight"].T
            h = rms(x, w[p + "ln_2.weight"])
            x = x + (h @ w[p + "mlp.w1.weight"].T * F.silu(h @ w[p + "mlp.w2.weight"].T)) @ w[p + "mlp.c_proj.weight"].T
        return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T

    def greedy(self, prompt: torch.Tensor, steps: int) -> list[int]:
        logits, out = self(prompt), []
        for _ in range(steps):
            out.append(int(logits[-1].argmax()))
            logits = self(torch.tensor([out[-1]]), use_cache=True)
        return out


def _ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 500, (length,), generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.fixture
def llm(v1_folder):
    return mllmkit.build("llm", "qwen", path=str(v1_folder), precision="fp32")


def _logits(llm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm.logits(llm.hidden(llm.embed(ids[None])))[0]


def test_alpha_matches_v1_formula():
    from mllmkit_llm_qwen.long_context import ntk_alpha

    for n in range(1, 40 * SEQ):
        assert ntk_alpha(n, SEQ) == reference_alpha(n), n
    assert [reference_alpha(n, 2048) for n in (2048, 2049, 4096, 4097, 6144)] == [1, 3, 3, 7, 7]


@pytest.mark.parametrize("length", [SEQ, SEQ + 1, 2 * SEQ, 2 * SEQ + 1, 3 * SEQ + 5])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_past_seq_length_matches_v1(v1_folder, v1_weights, length, attn):
    llm = mllmkit.build("llm", "qwen", path=str(v1_folder), precision="fp32", attn_implementation=attn)
    ids = _ids(length)
    got = _logits(llm, ids)
    _close(got, V1Reference(v1_weights)(ids))
    if length > SEQ + 1:  # both scalings change the result there (so this test can fail)
        plain = V1Reference(v1_weights, training=True)(ids)
        assert (got.double() - plain).abs().max() > 1e-2


def test_training_mode_uses_neither_scaling(llm, v1_weights):
    ids = _ids(2 * SEQ + 3)
    llm.hf_model.train()
    with torch.no_grad():
        got = llm.logits(llm.hidden(llm.embed(ids[None])))[0]
    _close(got, V1Reference(v1_weights, training=True)(ids))


def test_kv_cache_keeps_the_alpha_of_the_prompt(llm, v1_weights):
    """A 40-token prompt picks alpha 3; the cached steps keep it past 48 tokens, where a forward of the
    whole sequence would pick 7 (transformers' dynamic cache, as ``generate`` and beam search use)."""
    hf, ref = llm.hf_model, V1Reference(v1_weights)
    prompt = _ids(40)
    cache_kw = cache_keyword(hf.forward)
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        logits = hf(input_ids=prompt[None], use_cache=True, **{cache_kw: cache}).logits[0]
        _close(logits, ref(prompt))
        tokens = prompt.tolist()
        for _ in range(12):
            tokens.append(int(logits[-1].argmax()))
            logits = hf(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kw: cache}).logits[0]
            _close(logits, ref(torch.tensor([tokens[-1]]), use_cache=True))
    assert ref.alpha == 3 and reference_alpha(len(tokens)) == 7
    whole = _logits(llm, torch.tensor(tokens))[-1]  # a fresh forward chooses again: another result
    assert (whole.double() - logits[-1].double()).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["static", "hf"])
def test_generate_past_seq_length_matches_v1_greedy(llm, v1_weights, backend):
    prompt = _ids(30, seed=3)
    embeds = llm.embed(prompt[None])
    with torch.no_grad():
        got = generate(llm, embeds, max_new_tokens=24, backend=backend)
    assert got == V1Reference(v1_weights).greedy(prompt, 24)
    # the static decoder's prefill of a short prompt after a long one goes back to alpha 1
    short = _ids(SEQ - 4, seed=4)
    assert generate(llm, llm.embed(short[None]), max_new_tokens=6, backend=backend) == \
        V1Reference(v1_weights).greedy(short, 6)


def test_padded_batch_rows_each_get_their_own_alpha(llm):
    """Left padding not counted: each row computes what it computes alone (alpha 3 and alpha 1)."""
    long, short = _ids(2 * SEQ - 2, seed=5), _ids(SEQ - 6, seed=6)
    pad = long.shape[0] - short.shape[0]
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        both = llm.logits(llm.hidden(llm.embed(ids), attention_mask=mask, position_ids=position_ids))
    torch.testing.assert_close(both[0, -1], _logits(llm, long)[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1, -1], _logits(llm, short)[-1], atol=1e-5, rtol=1e-5)


def test_refused_only_past_max_position_embeddings(tmp_path, v1_weights):
    folder = write_v1_folder(tmp_path / "m", v1_weights, config=dict(LATER_CONFIG, max_position_embeddings=3 * SEQ))
    llm = mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert llm.max_positions == 3 * SEQ
    _logits(llm, _ids(3 * SEQ))
    with pytest.raises(ValueError) as info:
        _logits(llm, _ids(3 * SEQ + 1))
    assert str(info.value) == (f"sequence of {3 * SEQ + 1} tokens is longer than this model's {3 * SEQ} "
                               f"positions; shorten the input (max_text_len, chat history window)")


def test_chat_goes_past_seq_length(plugin_host, v1_folder, v1_weights):
    """The ChatML prompt alone is longer than seq_length; the answer is v1's greedy answer."""
    from mllmkit.chat import chat_session

    recipe = {"model": {"vision": {"type": "toy_vision"}, "bridges": [{"type": "linear"}],
                        "llm": {"type": "qwen", "path": str(v1_folder), "precision": "fp32"}}}
    session = chat_session(recipe, device="cpu", precision="fp32", max_new_tokens=8)
    session.ask("Tell me a long story about the sea and the ships that sail on it.")
    prompt = torch.tensor(session.last_prompt_ids)
    assert len(prompt) > SEQ
    stops = set(session.template.stop_token_ids)
    want = V1Reference(v1_weights).greedy(prompt, 8)
    want = want[:next((i for i, t in enumerate(want) if t in stops), len(want))]
    assert session.turns[0].answer == session.tokenizer.decode(want).strip()


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled_graph"])
def test_cuda_graph_decoder_keeps_the_prompt_alpha(v1_folder, v1_weights, compile):
    from mllmkit.generation import decoder_for

    llm = mllmkit.build("llm", "qwen", path=str(v1_folder), precision="fp32", device_map="cuda:0")
    decoder_for(llm, 64, use_cuda_graph=True, compile=compile)
    for seed, length in [(3, 30), (4, SEQ - 4), (7, 2 * SEQ + 5)]:
        prompt = _ids(length, seed=seed)
        got = generate(llm, llm.embed(prompt[None].cuda()), max_new_tokens=12)
        assert got == V1Reference(v1_weights).greedy(prompt, 12), (seed, length)
