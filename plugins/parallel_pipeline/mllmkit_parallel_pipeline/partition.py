"""Cost-based partition of the pipeline layers into stages (works on a meta-device model).

Cost model, per sample of ``seq_len`` tokens with ``images`` images:

- the embedding layer: the vision tower ``2·P·tokens`` per image (its attention ``4·N²·width``
  per block), each bridge ``2·P·tokens_out``; the token embedding costs memory, no FLOPs;
- a decoder layer: ``2·P·T + 4·T²·H`` (matmuls + attention);
- the final layer: the head ``2·P·T·label_fraction`` (it runs at labelled positions only).

The backward pass multiplies a layer's forward cost by 3 when it has trainable parameters, by 2
when gradients only flow through it to an earlier trainable part, by 1 when no gradient passes
(e.g. the frozen vision tower); activation checkpointing adds one forward to decoder layers.
Parameter memory (bytes in the model's dtypes) is counted per layer.

:func:`plan_partition` finds the contiguous split that minimises the slowest stage's FLOPs and,
among splits within 2 % of it, the largest stage's parameter bytes. An explicit ``stage_map``
(decoder layers per stage) overrides it. With a measured profile (``partition = "measured"``:
:func:`measure_layer_seconds` times each layer's forward + backward on a device, :func:`write_profile`
keeps the times in a JSON file and :func:`read_profile` puts them on the costs) the split balances
measured seconds instead of FLOPs, which the FLOP count misjudges for the vision tower and the head.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence

import attrs
import torch
from torch import nn

from mllmkit.errors import UserError

__all__ = ["LABEL_FRACTION", "LayerCost", "Plan", "format_plan", "layer_costs", "measure_layer_seconds",
           "plan_partition", "read_profile", "write_profile"]

LABEL_FRACTION = 0.5
"""Share of a sequence's positions assumed labelled (where the head runs)."""


@attrs.frozen
class LayerCost:
    name: str
    params: int
    param_bytes: int
    flops: float
    """Training FLOPs per sample (forward and backward)."""
    seconds: float | None = None
    """Measured forward + backward seconds per micro-batch (:func:`read_profile`), when known."""


@attrs.frozen
class Plan:
    """``parts[s]:parts[s+1]`` are stage ``s``'s layers."""

    parts: list[int]
    layers: list[LayerCost]
    source: str

    @property
    def num_stages(self) -> int:
        return len(self.parts) - 1

    def stage_layers(self, stage: int) -> list[LayerCost]:
        return self.layers[self.parts[stage]:self.parts[stage + 1]]

    def stage_flops(self) -> list[float]:
        return [sum(c.flops for c in self.stage_layers(s)) for s in range(self.num_stages)]

    def stage_seconds(self) -> list[float] | None:
        if any(c.seconds is None for c in self.layers):
            return None
        return [sum(c.seconds for c in self.stage_layers(s)) for s in range(self.num_stages)]

    def stage_bytes(self) -> list[int]:
        return [sum(c.param_bytes for c in self.stage_layers(s)) for s in range(self.num_stages)]

    def stage_params(self) -> list[int]:
        return [sum(c.params for c in self.stage_layers(s)) for s in range(self.num_stages)]

    def stage_decoder_layers(self) -> list[int]:
        return [sum(1 for c in self.stage_layers(s) if c.name.startswith("decoder")) for s in range(self.num_stages)]


def _params(module: nn.Module, seen: set[int]) -> tuple[int, int, bool]:
    count = size = 0
    trainable = False
    for param in module.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        count += param.numel()
        size += param.numel() * param.element_size()
        trainable = trainable or param.requires_grad
    return count, size, trainable


def layer_costs(model: nn.Module, seq_len: int, images: float = 1.0, checkpointing: bool = False,
                label_fraction: float = LABEL_FRACTION) -> list[LayerCost]:
    """Cost of each pipeline layer (embed, decoders, final) of an assembled (possibly meta) MLLM."""
    seen: set[int] = set()
    hidden = model.llm.hidden_size
    flow = False  # does a gradient reach this point from a trainable part before it?

    def factor(trainable: bool) -> int:
        return 3 if trainable else (2 if flow else 1)

    # embedding layer: vision, bridges, token embedding
    p_v, b_v, t_v = _params(model.vision, seen)
    n_v = model.vision.num_tokens
    blocks = list(model.vision.blocks()) if hasattr(model.vision, "blocks") else []
    width = getattr(model.vision, "out_dim", 0)
    vision_fwd = images * (2 * p_v * n_v + 4 * n_v * n_v * width * len(blocks))
    flops = vision_fwd * factor(t_v)
    flow = flow or t_v
    params, size = p_v, b_v
    tokens = n_v
    for bridge in model.bridges:
        p_b, b_b, t_b = _params(bridge, seen)
        tokens = bridge.tokens_out(tokens)
        flops += images * 2 * p_b * tokens * factor(t_b)
        flow = flow or t_b
        params, size = params + p_b, size + b_b
    p_e, b_e, t_e = _params(model.llm.embedding, seen)
    flow = flow or t_e
    costs = [LayerCost("embed (vision + bridges + embedding)", params + p_e, size + b_e, flops)]

    for i, layer in enumerate(model.llm.layers()):
        p_l, b_l, t_l = _params(layer, seen)
        fwd = 2 * p_l * seq_len + 4 * seq_len * seq_len * hidden
        extra = fwd if checkpointing and flow else 0.0
        costs.append(LayerCost(f"decoder {i}", p_l, b_l, fwd * factor(t_l) + extra))
        flow = flow or t_l

    p_n, b_n, t_n = _params(model.llm.norm, seen)
    p_h, b_h, t_h = _params(model.llm.head, seen)
    head_fwd = 2 * p_h * seq_len * label_fraction
    costs.append(LayerCost("final (norm + head)", p_n + p_h, b_n + b_h, head_fwd * factor(t_h or t_n)))
    return costs


def _stage_map_parts(costs: list[LayerCost], stage_map: list[int]) -> list[int]:
    decoders = len(costs) - 2
    if sum(stage_map) != decoders:
        raise UserError(f"parallel.stage_map = {list(stage_map)} places {sum(stage_map)} decoder layers, but the "
                        f"LLM has {decoders}; give counts that add up to {decoders}")
    parts = [0]
    for stage, count in enumerate(stage_map):
        parts.append(parts[-1] + count + (1 if stage == 0 else 0))
    parts[-1] += 1  # the final layer
    return parts


def _best_split(weights: list[float], k: int, limit: float | None, cap: list[float] | None) -> tuple[float, list[int]]:
    """Contiguous split of ``weights`` into ``k`` non-empty parts minimising the largest part sum;
    with ``cap`` (per-layer values) every part's ``cap`` sum must stay <= ``limit``."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    cprefix = [0.0]
    for c in cap or [0.0] * n:
        cprefix.append(cprefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    choice = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for parts in range(1, k + 1):
        for end in range(parts, n + 1):
            for start in range(parts - 1, end):
                if best[parts - 1][start] == inf:
                    continue
                if limit is not None and cprefix[end] - cprefix[start] > limit:
                    continue
                value = max(best[parts - 1][start], prefix[end] - prefix[start])
                if value < best[parts][end]:
                    best[parts][end], choice[parts][end] = value, start
    bounds = [n]
    for parts in range(k, 0, -1):
        bounds.append(choice[parts][bounds[-1]])
    return best[k][n], bounds[::-1]


def plan_partition(costs: list[LayerCost], num_stages: int, stage_map: list[int] | None = None) -> Plan:
    """The stage boundaries: ``stage_map`` if given, else balanced FLOPs, then balanced memory."""
    if stage_map is not None:
        if len(stage_map) != num_stages:
            raise UserError(f"parallel.stage_map has {len(stage_map)} entries but num_stages = {num_stages}")
        return Plan(parts=_stage_map_parts(costs, list(stage_map)), layers=costs, source="stage_map")
    if num_stages > len(costs):
        raise UserError(f"parallel.num_stages = {num_stages} is more than the {len(costs)} pipeline layers "
                        f"(embed + {len(costs) - 2} decoder layers + final)")
    measured = all(c.seconds is not None for c in costs)
    work = [c.seconds if measured else c.flops for c in costs]
    best_work, _ = _best_split(work, num_stages, None, None)
    # among splits within 2 % of the fastest, the one with the smallest largest stage in bytes
    _, parts = _best_split([float(c.param_bytes) for c in costs], num_stages, best_work * 1.02, work)
    return Plan(parts=parts, layers=costs, source="measured times" if measured else "cost model")


def measure_layer_seconds(layers: Sequence[nn.Module], inputs, device: torch.device, *, reps: int = 3,
                          loss: Callable[[nn.Module, object], torch.Tensor] | None = None) -> list[float]:
    """Median forward + backward seconds of each of ``layers`` (on ``device``, weights already there),
    fed in sequence from ``inputs`` (the first layer's input). Floating inputs get gradients, so a
    layer's backward is timed as the pipeline runs it; ``loss(layer, output)`` makes the last
    layer's scalar (default: the sum of its first output). The first of ``reps + 1`` runs warms up."""
    def detached(value):
        if isinstance(value, tuple):
            return tuple(detached(v) for v in value)
        if torch.is_tensor(value) and value.is_floating_point():
            return value.detach().requires_grad_(True)
        return value

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = []
    for k, layer in enumerate(layers):
        times = []
        for _ in range(reps + 1):
            x = detached(inputs)
            sync()
            start = time.perf_counter()
            out = layer(x)
            first = out[0] if isinstance(out, tuple) else out
            scalar = loss(layer, out) if loss is not None and k == len(layers) - 1 else first.float().sum()
            if scalar.requires_grad:
                scalar.backward()
            sync()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times[1:]))
        inputs = tuple(o.detach() if torch.is_tensor(o) else o for o in out) if isinstance(out, tuple) \
            else out.detach()
    return seconds


def write_profile(path: pathlib.Path, costs: Sequence[LayerCost], seconds: Sequence[float], **about) -> None:
    """Keep measured per-layer seconds (and what they were measured on, ``about``) in a JSON file, atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"layers": [c.name for c in costs], "seconds": list(seconds), **about}, indent=1)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def read_profile(path: pathlib.Path, costs: Sequence[LayerCost]) -> list[LayerCost]:
    """``costs`` with the measured seconds of the profile at ``path`` (its layers must be these layers)."""
    try:
        profile = json.loads(pathlib.Path(path).read_text())
        names, seconds = list(profile["layers"]), [float(s) for s in profile["seconds"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"parallel.profile: cannot read the layer-time profile {path} ({exc}); delete it to "
                        f"measure again, or set parallel.partition = 'cost'") from None
    if names != [c.name for c in costs] or len(seconds) != len(costs):
        raise UserError(f"parallel.profile: {path} times {len(names)} layers of another model (this one has "
                        f"{len(costs)}); delete it to measure again, or point parallel.profile at this model's")
    return [attrs.evolve(c, seconds=s) for c, s in zip(costs, seconds)]


def format_plan(plan: Plan) -> str:
    """A per-stage table: layers, decoder layers, parameters, bytes, FLOPs share."""
    total = sum(plan.stage_flops()) or 1.0
    measured = plan.stage_seconds()
    lines = [f"pipeline partition ({plan.source}): {plan.num_stages} stages",
             f"{'stage':>5} {'layers':>13} {'decoders':>8} {'params (M)':>11} {'GiB':>7} {'TFLOP/sample':>13} {'share':>6}"]
    for s in range(plan.num_stages):
        first, last = plan.parts[s], plan.parts[s + 1] - 1
        flops = plan.stage_flops()[s]
        lines.append(f"{s:>5} {f'{first}-{last}':>13} {plan.stage_decoder_layers()[s]:>8} "
                     f"{plan.stage_params()[s] / 1e6:>11.1f} {plan.stage_bytes()[s] / 2**30:>7.2f} "
                     f"{flops / 1e12:>13.3f} {flops / total:>6.1%}"
                     + (f"  measured {measured[s] * 1e3:.1f} ms ({measured[s] / sum(measured):.1%})" if measured else ""))
    return "\n".join(lines)
