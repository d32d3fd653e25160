"""The micro-batches of planned draws, read by a DataLoader that touches no global random state.

:func:`load_micro_batches` wraps ``torch.utils.data.DataLoader`` for the training loop. The loader
gets its own generator seeded from the run's seed and the epoch (:func:`loader_seed`): torch draws
its worker base seed from that generator when an iterator starts, which otherwise consumes the
global generator and would make a resumed run's dropout differ from the uninterrupted run's.
Skipped samples come back as part of their batch from any worker; with ``on_error = "fail"`` the
first one is raised here, in the main process, as its :class:`~mllmkit.data.errors.SampleError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from mllmkit.data.collate import Batch, EncodedDataset, EncodedSample
from mllmkit.data.errors import Skip

__all__ = ["load_micro_batches", "loader_seed"]


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's DataLoader generator (a function of the run's seed and the epoch alone)."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63 - 1)


def load_micro_batches(samples: EncodedDataset, micro_batches: Sequence[Sequence[tuple[int, int, int]]],
                       collate: Callable[[Sequence[EncodedSample | Skip]], Batch], num_workers: int,
                       seed: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Batches of ``micro_batches`` (lists of draws) in order; raises a failed sample under ``on_error = "fail"``.
    ``pin_memory``: batches in page-locked memory (:meth:`Batch.pin_memory`), copied to a GPU without a wait."""
    loader = torch.utils.data.DataLoader(samples, batch_sampler=[list(m) for m in micro_batches], collate_fn=collate,
                                         num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                         pin_memory=pin_memory)
    for batch in loader:
        if samples.on_error == "fail" and batch.skips:
            raise batch.skips[0].error()
        yield batch
