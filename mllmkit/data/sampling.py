"""Which samples each optimizer step uses: weighted mixing, shuffling, length grouping, sharding.

An epoch is a list of draws ``(dataset_no, index, seed)`` fixed by the run's seed and the epoch
number alone, so a resumed run sees exactly the draws the uninterrupted run would have. Each
optimizer step consumes ``micro_batch_size × grad_accum × world_size`` consecutive draws; rank ``r``
takes its ``grad_accum`` micro-batches from the ``r``-th slice, so N processes see the same global
batch as one process accumulating N times as many micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["epoch_order", "group_by_length", "rank_micro_batches", "steps_per_epoch"]

Draw = tuple[int, int, int]


def epoch_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> list[Draw]:
    """The epoch's draws. Dataset ``i`` contributes ``round(size_i × weight_i)`` draws: every record
    ``floor(weight)`` times plus a random subset for the fraction; then everything is shuffled."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    draws: list[tuple[int, int]] = []
    for dataset_no, (size, weight) in enumerate(zip(sizes, weights)):
        total = round(size * weight)
        whole, rest = divmod(total, size) if size else (0, 0)
        picks = list(range(size)) * whole + torch.randperm(size, generator=generator)[:rest].tolist()
        draws += [(dataset_no, i) for i in picks]
    order = torch.randperm(len(draws), generator=generator).tolist()
    seeds = torch.randint(0, 2**31 - 1, (len(draws),), generator=generator).tolist()
    return [(*draws[j], seeds[k]) for k, j in enumerate(order)]


def group_by_length(order: list[Draw], lengths: Sequence[int], micro_batch_size: int, window: int = 64) -> list[Draw]:
    """Sort draws by length inside windows of ``window`` micro-batches (so each micro-batch holds
    samples of similar length); ``lengths[k]`` is the length of ``order[k]``, keeping the windows in their shuffled order."""
    span = micro_batch_size * window
    grouped: list[Draw] = []
    for start in range(0, len(order), span):
        chunk = order[start:start + span]
        chunk_lengths = lengths[start:start + span]
        ranked = sorted(range(len(chunk)), key=lambda i: -chunk_lengths[i])  # stable: ties keep shuffled order
        grouped += [chunk[i] for i in ranked]
    return grouped


def steps_per_epoch(num_draws: int, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    """Whole optimizer steps in an epoch (the last incomplete global batch is dropped)."""
    return num_draws // (micro_batch_size * grad_accum * world_size)


def rank_micro_batches(order: list[Draw], step: int, micro_batch_size: int, grad_accum: int, world_size: int,
                       rank: int) -> list[list[Draw]]:
    """This rank's ``grad_accum`` micro-batches of optimizer step ``step`` (within the epoch)."""
    per_rank = micro_batch_size * grad_accum
    start = step * per_rank * world_size + rank * per_rank
    mine = order[start:start + per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
