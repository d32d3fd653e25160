"""mllmkit plugin: the BLIP-2 Q-Former bridge (``qformer``, ``qformer_tiny``) with ``ln_vision``.

The query path of LAVIS's Q-Former, built on transformers' ``Blip2QFormerModel``, and a loader for
LAVIS checkpoints such as ``blip2_pretrained_flant5xxl.pth`` (``{"model": state_dict}``).
"""

from mllmkit_bridge_qformer.component import SPECS, QFormerConfig, QFormerTinyConfig
from mllmkit_bridge_qformer.lavis_weights import LAVIS_QFORMER_KEYS, load_lavis_qformer
from mllmkit_bridge_qformer.model import (
    QFORMER_BASE,
    QFORMER_TINY,
    FP32LayerNorm,
    QFormerBridge,
    QFormerShape,
    build_qformer,
)

__all__ = [
    "LAVIS_QFORMER_KEYS",
    "QFORMER_BASE",
    "QFORMER_TINY",
    "SPECS",
    "FP32LayerNorm",
    "QFormerBridge",
    "QFormerConfig",
    "QFormerShape",
    "QFormerTinyConfig",
    "build_qformer",
    "load_lavis_qformer",
]
