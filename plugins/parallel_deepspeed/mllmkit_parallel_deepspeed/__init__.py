"""DeepSpeed parallel backends for mllmkit: ``zero`` (ZeRO stage 0–3) and ``pipeline`` (DP × PP).

Design note: the project layout names a ``parallel_pipeline`` plugin; both DeepSpeed backends live
in this one distribution instead because they share the DeepSpeed-specific parts — process-group
start-up with a timeout, the CPU accelerator choice, the hard exit that dodges DeepSpeed's
teardown abort, batch/clipping config building and the name-keyed checkpoint state. Each backend is
still its own component (``type = "zero"`` / ``type = "pipeline"`` in ``[parallel]``).

Both drive the same :class:`mllmkit.interfaces.Engine` contract as the built-in ``single``/``ddp``
backends, so ``mllmkit run`` trains the same recipe under any of them: AdamW with the recipe's
parameter groups over trainable parameters only, the warmup+cosine schedule in optimizer steps,
token-weighted loss over the whole optimizer step, and checkpoints keyed by MLLM parameter names.
"""

__all__: list[str] = []
