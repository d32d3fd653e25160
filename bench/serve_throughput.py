"""Benchmark: ``mllmkit serve`` throughput and latency at several concurrencies, against sequential HF generate.

    python bench/serve_throughput.py                 # GPU: MiniGPT4Qwen-7B shape, random weights, bf16 LLM
    python bench/serve_throughput.py --tiny          # CPU smoke test at toy size

The server is the one ``mllmkit serve`` runs (:func:`mllmkit.serve.command.build_server`, uvicorn in a
thread of this process, batches of up to the highest concurrency); the clients are the official
``openai`` package, one thread and one client per concurrent user, each streaming (for the time to
first token) ``--rounds`` requests one after another. Every request is one image (random pixels, a
PNG data URL) + a ~100-token question, greedy, ``max_tokens`` 128. Per concurrency: aggregate
generated tokens/s (all completion tokens / wall time), p50/p99 request latency, time to first
token (the first chunk with text) and content chunks per request (text streamed as it is decoded).
The baseline is transformers ``generate`` on the same prompts one at a time (dynamic cache,
``min_new_tokens`` = ``max_tokens``), timed from pixels and ids in to tokens out. Random weights can
end an answer early at a stop token; the token counts the server reports are what is counted.
"""

from __future__ import annotations

import argparse
import base64
import io
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _plugins as B  # noqa: E402
import torch  # noqa: E402

import mllmkit  # noqa: E402
from mllmkit.chat.loading import place_model  # noqa: E402
from mllmkit.generation_settings import GenerationSettings  # noqa: E402
from mllmkit.serve.engine import Engine  # noqa: E402
from mllmkit.serve.images import ImageLimits  # noqa: E402
from mllmkit.serve.prompt import build_prompt  # noqa: E402
from mllmkit.serve.schema import Message  # noqa: E402
from mllmkit.testing.serve import running_server  # noqa: E402


def _png(seed: int, size: int) -> str:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def _messages(i: int, size: int) -> list[dict]:
    question = f"Request {i}. " + " ".join(f"describe part {k} of the picture," for k in range(14))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(i, size)}},
                                         {"type": "text", "text": question}]}]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _clients(url: str, concurrency: int, rounds: int, new_tokens: int, size: int, offset: int) -> dict:
    """``concurrency`` users, each streaming ``rounds`` requests; latency, TTFT and token counts."""
    import openai

    records: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()

    def user(u: int) -> None:
        client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=3600)
        for r in range(rounds):
            start, first, tokens, pieces = time.perf_counter(), None, 0, 0
            stream = client.chat.completions.create(model="bench", messages=_messages(offset + u * rounds + r, size),
                                                    max_tokens=new_tokens, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    pieces += 1
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            end = time.perf_counter()
            with lock:
                records.append((end - start, (first or end) - start, tokens, pieces))

    threads = [threading.Thread(target=user, args=(u,)) for u in range(concurrency)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    latency, ttft, tokens, pieces = zip(*records)
    return {"requests": len(records), "wall_s": round(wall, 3), "completion_tokens": sum(tokens),
            "content_chunks_per_request": round(sum(pieces) / len(records), 1),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "latency_p50_s": round(_percentile(latency, 0.5), 3), "latency_p99_s": round(_percentile(latency, 0.99), 3),
            "ttft_p50_s": round(_percentile(ttft, 0.5), 3), "ttft_p99_s": round(_percentile(ttft, 0.99), 3)}


def _hf_sequential(engine: Engine, requests: int, new_tokens: int, size: int) -> dict:
    """transformers ``generate`` on the same kind of prompts, one at a time."""
    from transformers import GenerationConfig

    model, template = engine.model, engine.model.llm.template
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, bos_token_id=None, pad_token_id=template.pad_token_id)
    latencies, tokens = [], 0
    for i in range(requests + 1):  # the first is a warm-up
        messages = [Message.model_validate(m) for m in _messages(10_000 + i, size)]
        prompt = build_prompt(model, messages, system=None, max_window_tokens=engine.max_window_tokens,
                              limits=ImageLimits(), transform=engine.transform)
        B.sync()
        start = time.perf_counter()
        with torch.inference_mode():
            ids = torch.tensor([prompt.ids], device=engine.device)
            embeds = model.embed(ids, pixels=prompt.pixels.to(engine.device))
            out = model.llm.hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                              generation_config=config)
        B.sync()
        if i:
            latencies.append(time.perf_counter() - start)
            tokens += out.shape[1]
    return {"requests": requests, "completion_tokens": tokens, "tokens_per_s": round(tokens / sum(latencies), 1),
            "latency_p50_s": round(_percentile(latencies, 0.5), 3),
            "latency_p99_s": round(_percentile(latencies, 0.99), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy-size parts on CPU (a smoke test)")
    ap.add_argument("--concurrency", type=int, nargs="+", help="default: 1 8 32 (tiny: 1 4)")
    ap.add_argument("--rounds", type=int, help="requests per user (default 4; tiny 2)")
    ap.add_argument("--new-tokens", type=int, help="max_tokens of each request (default 128; tiny 16)")
    ap.add_argument("--hf-requests", type=int, help="sequential transformers generate requests (default 8; tiny 2)")
    args = ap.parse_args()
    concurrency = args.concurrency or ([1, 4] if args.tiny else [1, 8, 32])
    rounds = args.rounds or (2 if args.tiny else 4)
    new_tokens = args.new_tokens or (16 if args.tiny else 128)
    hf_requests = args.hf_requests or (2 if args.tiny else 8)
    device = "cpu" if args.tiny else "cuda"

    B.register_plugins()
    torch.manual_seed(0)
    result: dict = {**B.environment(), "tiny": args.tiny, "new_tokens": new_tokens, "rounds": rounds}
    t0 = time.perf_counter()
    model = mllmkit.assemble(mllmkit.load_recipe(B.recipe(args.tiny, device="cpu" if args.tiny else "cuda:0")))
    place_model(model, device, None)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    size = model.vision.image_size
    engine = Engine(model, settings=GenerationSettings(max_new_tokens=new_tokens), max_batch=max(concurrency),
                    max_queue=max(concurrency) * 2)

    runs, rows = {}, []
    with running_server(engine, model_name="bench") as url:
        for c in concurrency:
            _clients(url, c, 1, new_tokens, size, offset=50_000 + c)  # warm-up: decoder and graph of this batch size
            measured = runs[f"serve c={c}"] = _clients(url, c, rounds, new_tokens, size, offset=c * 1000)
            rows.append([f"mllmkit serve, concurrency {c}", measured["requests"], measured["tokens_per_s"],
                         measured["latency_p50_s"], measured["latency_p99_s"], measured["ttft_p50_s"],
                         measured["ttft_p99_s"]])
    result["batch_sizes"] = dict(sorted(engine.batch_sizes.items()))
    hf = runs["transformers generate, sequential"] = _hf_sequential(engine, hf_requests, new_tokens, size)
    rows.append(["transformers generate, sequential", hf["requests"], hf["tokens_per_s"], hf["latency_p50_s"],
                 hf["latency_p99_s"], "-", "-"])
    for run in runs.values():
        run["speedup_vs_hf"] = round(run["tokens_per_s"] / hf["tokens_per_s"], 2)
    result["runs"] = runs
    result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else None
    B.write_result("serve_throughput_tiny" if args.tiny else "serve_throughput", result, args.tiny)
    B.print_table(f"mllmkit serve, one image + ~100-token question, {new_tokens} new tokens, greedy "
                  f"({'tiny, CPU' if args.tiny else 'MiniGPT4Qwen-7B bf16'})",
                  ["path", "requests", "tok/s", "p50 s", "p99 s", "TTFT p50 s", "TTFT p99 s"], rows)


if __name__ == "__main__":
    main()
