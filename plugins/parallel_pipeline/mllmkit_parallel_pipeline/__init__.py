"""DeepSpeed pipeline parallel for mllmkit: ``pipeline`` (N stages × data parallel).

The assembled MLLM is cut into pipeline layers through the MLLM and LLM interfaces
(:mod:`~mllmkit_parallel_pipeline.pipe_layers`), partitioned by estimated cost or an explicit stage
map (:mod:`~mllmkit_parallel_pipeline.partition`), and stepped by the core's one optimizer step
(:class:`mllmkit.train.engine.Engine`) through a DeepSpeed pipeline schedule
(:mod:`~mllmkit_parallel_pipeline.pipeline`). DeepSpeed's process-group start-up and the optimizer
state by parameter name come from the core (:mod:`mllmkit.train.deepspeed`), so a run resumes under
any backend.
"""

__all__: list[str] = []
