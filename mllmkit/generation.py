"""Fast batch-1 decoding for chat: a static KV cache and a CUDA-graph single-token step.

:func:`generate` takes prompt embeddings (text embeddings with the image rows already scattered in,
as :meth:`mllmkit.model.MLLM.embed` makes them) and returns the new token ids. On CUDA, one
:class:`Decoder` per LLM (kept between calls) owns a transformers ``StaticCache`` and a captured CUDA
graph of "embed one token → all layers → head", so each new token costs one graph replay instead of
hundreds of kernel launches from Python. The host reads each token one step behind the GPU (the next
step is queued before the host looks at the token), so the host work of stop checks and streaming
overlaps the GPU. Elsewhere (CPU) the same static-cache loop runs eagerly; ``backend="hf"`` uses plain
transformers ``generate`` instead. A decoder fuses each frozen layer's q/k/v and gate/up weights into
one matmul each (:func:`mllmkit.fused_projections.fuse_projections`; same weights, fewer launches),
and left-pads a prompt to a multiple of ``PREFILL_BUCKET`` tokens (masked out, positions unchanged),
so prompts of many lengths share a few prefill shapes; on CUDA each of those prefills is a CUDA graph
too, captured at its first use (:class:`mllmkit.cuda_graphs.CapturedCall`).

Token selection follows transformers ``generate``: float32 logits, then its own processors in its
order (repetition penalty over the generated tokens, temperature, top-k, top-p), then ``argmax`` or
``torch.multinomial``. With the same logits and the same random state the tokens are the same.

Example::

    ids = generate(mllm.llm, embeds, mask, max_new_tokens=256, stop_token_ids=template.stop_token_ids,
                   on_token=lambda t: print(tokenizer.decode([t]), end=""))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from mllmkit.cuda_graphs import CapturedCall
from mllmkit.fused_projections import fuse_projections
from mllmkit.hf_llm import cache_keyword

__all__ = ["PREFILL_BUCKET", "generate", "Decoder", "decoder_for", "TokenCallback"]

#: Called with each new token id, in order; returning True stops generation after that token.
TokenCallback = Callable[[int], "bool | None"]

_DECODERS: weakref.WeakKeyDictionary[nn.Module, Decoder] = weakref.WeakKeyDictionary()
_BATCH_DECODERS: weakref.WeakKeyDictionary[nn.Module, dict[int, Decoder]] = weakref.WeakKeyDictionary()  # by rows
_CACHE_LEN_STEP = 256  # static cache lengths are rounded up to this (one graph serves many prompts)
PREFILL_BUCKET = 64
"""Prompt lengths are left-padded to a multiple of this (where the cache has room) before the prefill."""


def _hf_model(llm: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside an mllmkit LLM (or the model itself)."""
    return getattr(llm, "hf_model", llm)


def _logits_processors(do_sample: bool, temperature: float, top_k: int, top_p: float,
                       repetition_penalty: float):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


class Decoder:
    """Static-cache decoder for one causal LM; on CUDA its one-token step is a CUDA graph.

    ``max_cache_len`` bounds prompt + new tokens; a longer request makes :func:`decoder_for` build a
    larger decoder (the old one is dropped with its cache). :meth:`generate` decodes one prompt
    (``batch_size`` 1); with ``batch_size`` > 1 the cache, the step and its graph hold that many rows,
    each with its own valid keys and positions, and :mod:`mllmkit.generation_batch` runs the loop.
    ``fuse``: fuse the frozen layers' projections first (in place, for every later use of the model;
    build the decoder after the model is on its device and in its dtype).
    """

    def __init__(self, llm: nn.Module, max_cache_len: int, *, use_cuda_graph: bool | None = None,
                 compile: bool = False, batch_size: int = 1, fuse: bool = True) -> None:
        from transformers import StaticCache

        self.hf_model = _hf_model(llm)
        self.fused_groups = fuse_projections(self.hf_model) if fuse else 0
        self.model = self.hf_model.model
        self._cache_kw = cache_keyword(self.model.forward)
        param = next(self.hf_model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_cache_len = int(max_cache_len)
        self.batch_size = rows = int(batch_size)
        self.use_cuda_graph = (self.device.type == "cuda") if use_cuda_graph is None else use_cuda_graph
        self.cache = StaticCache(config=self.hf_model.config, max_cache_len=self.max_cache_len)
        dev = self.device
        self._arange = torch.arange(self.max_cache_len, device=dev)
        self._valid = torch.ones(rows, self.max_cache_len, dtype=torch.bool, device=dev)  # key j is a real token
        self._ids = torch.zeros(rows, 1, dtype=torch.long, device=dev)        # the token being fed
        self._pos = torch.zeros(rows, 1, dtype=torch.long, device=dev)        # its rotary position
        self._slot = torch.zeros((), dtype=torch.long, device=dev)         # its cache slot
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._prefills: dict[int, CapturedCall] = {}  # by prompt length (multiples of PREFILL_BUCKET)
        self._prefill_pool = None
        self.compiled = compile
        # torch.compile fuses the step's elementwise work (norms, rotary, SiLU·mul, casts) into fewer
        # kernels; the compiled step is then captured in the CUDA graph like the eager one.
        self._step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        # First call initialises the cache tensors (lazy in transformers); the graph needs them fixed.
        with torch.inference_mode():
            self._prefill(torch.zeros(rows, 1, self.hf_model.config.hidden_size, device=dev, dtype=self.dtype),
                          torch.ones(rows, 1, dtype=torch.bool, device=dev))
            if self.use_cuda_graph:
                self._capture()

    # -- the cache --
    def _set_length(self, length: int) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", True):
                layer.cumulative_length.fill_(length)

    # -- the two forward passes --
    def _prefill(self, embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run the prompts (``[rows, L, H]``, ``valid [rows, L]``) into an empty cache; last position's logits."""
        length = embeds.shape[1]
        self._set_length(0)
        self._valid.fill_(True)
        self._valid[:, :length] = valid
        keys = self._arange
        queries = torch.arange(length, device=self.device)
        mask = (keys[None, :] <= queries[:, None]) & self._valid[:, None, :]
        mask |= keys[None, :] == queries[:, None]  # a padding query attends to itself (no empty softmax row)
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(inputs_embeds=embeds.to(self.dtype), attention_mask=mask[:, None],
                            position_ids=position_ids, use_cache=True, **{self._cache_kw: self.cache}).last_hidden_state
        return self.hf_model.lm_head(hidden[:, -1:]).float()[:, -1]

    def _step(self) -> torch.Tensor:
        """One token a row: ``self._ids`` at ``self._pos`` into slot ``self._slot``; ``[rows, vocab]`` logits."""
        embeds = self.model.embed_tokens(self._ids)
        mask = (self._arange <= self._slot) & self._valid
        hidden = self.model(inputs_embeds=embeds, attention_mask=mask.view(self.batch_size, 1, 1, -1),
                            position_ids=self._pos, use_cache=True, **{self._cache_kw: self.cache}).last_hidden_state
        return self.hf_model.lm_head(hidden).float()[:, -1]

    def _capture(self) -> None:
        self._set_length(1)
        self._slot.fill_(1)
        self._pos.fill_(1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the graph (compilation, library handles, workspaces)
                self._set_length(1)
                self._step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self._set_length(1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step_fn()
        self._graph = graph

    def _run_step(self) -> torch.Tensor:
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._step_fn()

    def bucket(self, inputs_embeds: torch.Tensor, valid: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, L, H]`` prompts and ``valid`` left-padded to a multiple of :data:`PREFILL_BUCKET`
        positions (padding invalid) when that and ``new_tokens`` fit the cache; else unchanged."""
        length = inputs_embeds.shape[1]
        pad = -length % PREFILL_BUCKET
        if pad == 0 or length + pad + new_tokens > self.max_cache_len:
            return inputs_embeds, valid
        rows = inputs_embeds.shape[0]
        return (torch.cat([inputs_embeds.new_zeros(rows, pad, inputs_embeds.shape[2]), inputs_embeds], dim=1),
                torch.cat([valid.new_zeros(rows, pad), valid], dim=1))

    def prefill(self, inputs_embeds: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run ``[rows, L, H]`` prompts (``valid [rows, L]``, left padding False) into an empty cache;
        returns the last position's ``[rows, vocab]`` float32 logits (with a CUDA graph: a buffer that
        the next prefill of this length overwrites). With CUDA graphs, a bucketed length (a multiple of
        :data:`PREFILL_BUCKET`) replays a graph captured at its first prefill."""
        embeds = inputs_embeds.to(device=self.device, dtype=self.dtype)
        valid = valid.to(self.device)
        length = embeds.shape[1]
        if not self.use_cuda_graph or length % PREFILL_BUCKET:
            return self._prefill(embeds, valid)
        call = self._prefills.get(length)
        if call is None:
            if self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            call = self._prefills[length] = CapturedCall(self._prefill, [embeds, valid], pool=self._prefill_pool,
                                                         warmup=1)
        return call(embeds, valid)

    def step(self, ids: torch.Tensor, positions: torch.Tensor | int, slot: int) -> torch.Tensor:
        """Feed one token a row (``ids [rows]`` at rotary ``positions``) into cache ``slot``; returns the
        ``[rows, vocab]`` float32 logits (a view that the next step overwrites)."""
        self._ids.copy_(ids.view(self.batch_size, 1))
        if isinstance(positions, int):
            self._pos.fill_(positions)
        else:
            self._pos.copy_(positions.view(self.batch_size, 1))
        self._slot.fill_(slot)
        return self._run_step()

    # -- the loop --
    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, stop_token_ids: Sequence[int] = (), do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, on_token: TokenCallback | None = None) -> list[int]:
        if self.batch_size != 1:
            raise ValueError(f"this decoder holds {self.batch_size} rows; decode batches with "
                             f"mllmkit.generation_batch.generate_batch")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
            raise ValueError(f"generate takes one prompt: inputs_embeds [1, length, hidden], got "
                             f"{tuple(inputs_embeds.shape)}")
        length = inputs_embeds.shape[1]
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds this decoder's "
                             f"cache of {self.max_cache_len} positions")
        if max_new_tokens <= 0:
            return []
        valid = (torch.ones(1, length, dtype=torch.bool, device=self.device) if attention_mask is None
                 else attention_mask.to(self.device).bool())
        inputs_embeds, valid = self.bucket(inputs_embeds.to(self.device), valid, max_new_tokens)
        length = inputs_embeds.shape[1]
        stops = {int(t) for t in stop_token_ids}
        processors = _logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty)
        generated = torch.zeros(1, max_new_tokens, dtype=torch.long, device=self.device)
        host = torch.zeros(max_new_tokens, dtype=torch.long, pin_memory=self.device.type == "cuda")
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        next_pos = int(valid.sum())  # rotary position of the first new token (left padding not counted)

        logits = self.prefill(inputs_embeds, valid)
        out: list[int] = []
        for step in range(max_new_tokens):
            scores = processors(generated[:, :step], logits) if processors else logits
            if do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)[:, 0]
            else:
                token = torch.argmax(scores, dim=-1)
            generated[:, step] = token
            host[step:step + 1].copy_(token, non_blocking=ready is not None)
            if ready is not None:
                ready.record()
            if step + 1 < max_new_tokens:  # queue the next step before looking at this token
                logits = self.step(token, next_pos + step, length + step)
            if ready is not None:
                ready.synchronize()
            tok = int(host[step])
            if tok in stops:
                break
            out.append(tok)
            if on_token is not None and on_token(tok):
                break
        return out


def decoder_for(llm: nn.Module, needed_len: int, *, use_cuda_graph: bool | None = None,
                compile: bool | None = None, batch_size: int = 1) -> Decoder:
    """The LLM's cached :class:`Decoder` of ``batch_size`` rows (one kept per row count), rebuilt with a
    larger cache when ``needed_len`` does not fit (or when ``use_cuda_graph`` / ``compile`` is given and
    differs from the cached one's)."""
    hf_model = _hf_model(llm)
    key, decoders = (hf_model, _DECODERS) if batch_size == 1 else (batch_size, _BATCH_DECODERS.setdefault(hf_model, {}))
    decoder = decoders.get(key)
    if decoder is None or decoder.max_cache_len < needed_len or (
            use_cuda_graph is not None and decoder.use_cuda_graph != use_cuda_graph) or (
            compile is not None and decoder.compiled != compile):
        if decoder is not None:
            decoders.pop(key, None)
            del decoder
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        size = -(-needed_len // _CACHE_LEN_STEP) * _CACHE_LEN_STEP
        decoder = decoders[key] = Decoder(llm, size, use_cuda_graph=use_cuda_graph, compile=bool(compile),
                                          batch_size=batch_size)
    return decoder


def _hf_generate(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, *,
                 max_new_tokens: int, stop_token_ids: Sequence[int], do_sample: bool, temperature: float,
                 top_k: int, top_p: float, repetition_penalty: float, on_token: TokenCallback | None) -> list[int]:
    """Plain transformers ``generate`` with the same settings (reference and fallback)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    hf_model = _hf_model(llm)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                              eos_token_id=list(stop_token_ids) or None, bos_token_id=None,
                              pad_token_id=hf_model.generation_config.pad_token_id)
    stops = {int(t) for t in stop_token_ids}
    emitted: list[int] = []

    class _Stream(StoppingCriteria):  # sees each new token as generate appends it
        def __call__(self, input_ids, scores, **kwargs):
            tok = int(input_ids[0, -1])
            if tok in stops:
                return torch.ones(1, dtype=torch.bool, device=input_ids.device)
            emitted.append(tok)
            stop = bool(on_token(tok)) if on_token is not None else False
            return torch.full((1,), stop, dtype=torch.bool, device=input_ids.device)

    with torch.inference_mode():
        hf_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=config,
                          stopping_criteria=StoppingCriteriaList([_Stream()]))
    return emitted


def generate(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, stop_token_ids: Sequence[int] = (), do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             on_token: TokenCallback | None = None, backend: str = "static") -> list[int]:
    """New token ids after the prompt ``inputs_embeds [1, L, H]`` (stop token not included).

    ``backend``: ``"static"`` (static cache; CUDA graph on CUDA, eager elsewhere) or ``"hf"``
    (transformers ``generate``). ``on_token`` gets each token as it is chosen; returning True stops.
    ``top_k = 0`` and ``top_p = 1.0`` mean off; they and ``temperature`` apply only when sampling.
    """
    settings = dict(max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids, do_sample=do_sample,
                    temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                    on_token=on_token)
    if backend == "hf":
        return _hf_generate(llm, inputs_embeds, attention_mask, **settings)
    if backend != "static":
        raise ValueError(f"generate: backend must be 'static' or 'hf', not {backend!r}")
    decoder = decoder_for(llm, inputs_embeds.shape[1] + max_new_tokens)
    return decoder.generate(inputs_embeds, attention_mask, **settings)
