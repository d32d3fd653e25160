"""Frozen image features computed once per image and reused across epochs (``[train] cache_features``).

With a frozen vision encoder the output of the encoder and of the frozen bridges after it
(:meth:`~mllmkit.model.MLLM.image_features`) is the same every epoch, as long as an image always
becomes the same pixels. :class:`FeatureCache` keeps those features by image (the batch's
``image_keys``: sample source, index, image number) and hands a batch to the model with features
instead of pixels (:meth:`FeatureCache.attach`); the model applies only the bridges that train.
``where = "memory"`` keeps them on the training device for this run; ``"disk"`` also writes each
image's features to ``<run>/feature_cache/<fingerprint>/`` (safetensors, atomically), so a resumed
or repeated run reads them back instead of running the encoder. The folder is named by
:func:`fingerprint`: a hash of the frozen parts' recipe tables, the image transform and every byte
of the frozen parts' weights, so changing any of them starts a new folder. :func:`check_cacheable`
refuses, as a recipe error, a training vision encoder or a random training transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch

from mllmkit.data.collate import Batch
from mllmkit.errors import RecipeError
from mllmkit.model import MLLM

__all__ = ["FeatureCache", "check_cacheable", "fingerprint", "transform_is_random"]


def transform_is_random(transform: Callable[[Any], torch.Tensor], image_size: int) -> bool:
    """Whether ``transform`` gives a probe picture different pixels under two seeds (random crops, flips)."""
    from PIL import Image

    ramp = torch.arange(2 * image_size) % 256
    rows, cols = ramp[:, None].expand(-1, ramp.numel()), ramp[None, :].expand(ramp.numel(), -1)
    probe = torch.stack([rows, cols, (rows * cols) % 256], dim=-1).to(torch.uint8)  # no symmetry a flip keeps
    picture = Image.fromarray(probe.numpy())
    outputs = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            outputs.append(transform(picture))
    return not torch.equal(*outputs)


def check_cacheable(model: MLLM, transform: Callable[[Any], torch.Tensor]) -> None:
    """Raise a :class:`RecipeError` at ``train.cache_features`` when cached features would go stale."""
    if model.frozen_prefix() < 0:
        raise RecipeError("train.cache_features", "the vision encoder trains (model.vision.trainable = true), so "
                          "its features change every step; set cache_features = false or freeze the encoder")
    if transform_is_random(transform, model.vision.image_size):
        raise RecipeError("train.cache_features", "the training image transform is random (augmentation), so an "
                          "image gives different features each epoch; set [data] augment = false to cache them")


def _frozen_parts(model: MLLM) -> list[str]:
    return ["vision", *(f"bridges.{i}" for i in range(model.frozen_prefix()))]


def fingerprint(model: MLLM, config: Any) -> str:
    """A hash of ``config`` (the frozen parts' recipe tables, the transform: anything JSON can write),
    the precision each frozen part runs in here (fp16 runs in fp32 on a CPU) and every parameter and
    buffer of the frozen parts: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode())
    for part in _frozen_parts(model):
        digest.update(f"{part}:{model.part_precision.get(part, 'fp32')}".encode())
    for part in _frozen_parts(model):
        for name, tensor in model.get_submodule(part).state_dict().items():
            digest.update(f"{part}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().data)
    return digest.hexdigest()[:24]


@attrs.define
class FeatureCache:
    """Features of the frozen parts by image key, filled on first sight (see the module docstring)."""

    model: MLLM
    device: torch.device
    folder: pathlib.Path | None = None
    """``<run>/feature_cache/<fingerprint>`` for ``where = "disk"``; ``None`` keeps features in memory only."""
    store: dict[tuple[str, int, int], torch.Tensor] = attrs.Factory(dict)
    computed: int = 0
    """Images whose features this process computed (the rest came from memory or disk)."""

    @classmethod
    def create(cls, model: MLLM, device: torch.device | str, where: Literal["memory", "disk"], run_dir: pathlib.Path,
               model_tables: dict[str, Any], transform: Callable[[Any], torch.Tensor]) -> FeatureCache:
        """A cache for ``model`` on ``device``; ``model_tables``: the recipe's ``[model]`` tables, of
        which the frozen parts' enter the fingerprint with the transform (:func:`check_cacheable` first)."""
        check_cacheable(model, transform)
        folder = None
        if where == "disk":
            config = {"vision": model_tables.get("vision"), "transform": repr(transform),
                      "bridges": list(model_tables.get("bridges", []))[:model.frozen_prefix()]}
            folder = pathlib.Path(run_dir) / "feature_cache" / fingerprint(model, config)
            folder.mkdir(parents=True, exist_ok=True)
        return cls(model=model, device=torch.device(device), folder=folder)

    def attach(self, batch: Batch) -> Batch:
        """``batch`` with its images' features (``image_features``) in place of its pixels."""
        if batch.pixels is None:
            return batch
        if len(batch.image_keys) != batch.pixels.shape[0]:
            raise ValueError(f"the batch names {len(batch.image_keys)} image keys for {batch.pixels.shape[0]} images")
        missing = [i for i, key in enumerate(batch.image_keys) if not self._lookup(key)]
        if missing:
            with torch.no_grad():
                features = self.model.image_features(batch.pixels[missing].to(self.device, non_blocking=True))
            self.computed += len(missing)
            for i, feature in zip(missing, features):
                self._keep(batch.image_keys[i], feature)
        stacked = torch.stack([self.store[key] for key in batch.image_keys])
        return attrs.evolve(batch, pixels=None, image_features=stacked)

    def _path(self, key: tuple[str, int, int]) -> pathlib.Path:
        name = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32]
        return self.folder / f"{name}.safetensors"

    def _lookup(self, key: tuple[str, int, int]) -> bool:
        if key in self.store:
            return True
        if self.folder is None or not self._path(key).is_file():
            return False
        from safetensors.torch import load_file

        self.store[key] = load_file(self._path(key), device=str(self.device))["features"]
        return True

    def _keep(self, key: tuple[str, int, int], feature: torch.Tensor) -> None:
        feature = feature.clone()  # not a view holding the whole batch's storage
        self.store[key] = feature
        if self.folder is not None:
            from safetensors.torch import save_file

            path = self._path(key)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            save_file({"features": feature.contiguous()}, partial, metadata={"key": json.dumps(list(key))})
            os.replace(partial, path)
