"""Data: sample errors and skip accounting, image reading, encoding and collation, epoch planning, loading."""

from mllmkit.data.collate import Batch, Collator, EncodedDataset, EncodedSample, SampleEncoder, open_image
from mllmkit.data.errors import CAUSES, SampleError, Skip, SkipReport
from mllmkit.data.images import MAX_IMAGE_PIXELS, read_image
from mllmkit.data.loader import load_micro_batches, loader_seed
from mllmkit.data.sampling import epoch_order, group_by_length, rank_micro_batches, steps_per_epoch

__all__ = [
           "CAUSES",
           "MAX_IMAGE_PIXELS",
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
           "load_micro_batches",
           "loader_seed",
           "open_image",
           "rank_micro_batches",
           "read_image",
           "steps_per_epoch",
]
