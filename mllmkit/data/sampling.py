"""Which samples each optimizer step uses: weighted mixing, shuffling, length grouping, sharding.

An epoch is a list of draws ``(dataset_no, index, seed)`` fixed by the run's seed and the epoch
number alone, so a resumed run sees exactly the draws the uninterrupted run would have. Each
optimizer step consumes ``micro_batch_size × grad_accum × world_size`` consecutive draws; rank ``r``
takes its ``grad_accum`` micro-batches from the ``r``-th slice, so N processes see the same global
batch as one process accumulating N times as many micro-batches. An epoch's micro-batches are either
consecutive runs of ``micro_batch_size`` draws (:func:`epoch_micro_batches`) or packed rows
(:func:`mllmkit.data.packing.pack_draws`); :func:`rank_step` slices either the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["epoch_micro_batches", "epoch_order", "group_by_length", "rank_micro_batches", "rank_step",
           "steps_per_epoch"]

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


def epoch_micro_batches(order: list[Draw], micro_batch_size: int) -> list[list[Draw]]:
    """Consecutive runs of ``micro_batch_size`` draws (an incomplete last one is dropped)."""
    whole = len(order) // micro_batch_size * micro_batch_size
    return [order[i:i + micro_batch_size] for i in range(0, whole, micro_batch_size)]


def rank_step(micro_batches: Sequence[list[Draw]], step: int, grad_accum: int, world_size: int,
              rank: int) -> list[list[Draw]]:
    """This rank's ``grad_accum`` of an epoch's ``micro_batches`` at optimizer step ``step`` (within the epoch)."""
    start = (step * world_size + rank) * grad_accum
    return list(micro_batches[start:start + grad_accum])


def rank_micro_batches(order: list[Draw], step: int, micro_batch_size: int, grad_accum: int, world_size: int,
                       rank: int) -> list[list[Draw]]:
    """This rank's ``grad_accum`` micro-batches of optimizer step ``step`` (within the epoch)."""
    return rank_step(epoch_micro_batches(order, micro_batch_size), step, grad_accum, world_size, rank)
