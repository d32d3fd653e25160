"""Data: sample errors and skip accounting, encoding and collation, epoch planning."""

from mllmkit.data.collate import Batch, Collator, EncodedDataset, EncodedSample, SampleEncoder, open_image
from mllmkit.data.errors import CAUSES, SampleError, Skip, SkipReport
from mllmkit.data.sampling import epoch_order, group_by_length, rank_micro_batches, steps_per_epoch

__all__ = [
           "CAUSES",
           "Batch",
           "Collator",
           "EncodedDataset",
           "EncodedSample",
           "SampleEncoder",
           "SampleError",
           "Skip",
           "SkipReport",
           "epoch_order",
           "group_by_length",
           "open_image",
           "rank_micro_batches",
           "steps_per_epoch",
]
