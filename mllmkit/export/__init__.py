"""Export to a standard transformers class, with parity verified, and back.

``mllmkit export RECIPE --checkpoint CKPT --to DIR [--verify]`` writes a folder that transformers
loads without remote code with the class the model's parts fit (:mod:`mllmkit.export.targets`:
``Blip2ForConditionalGeneration`` for EVA → Q-Former → Linear → LLM, ``LlavaForConditionalGeneration``
for CLIP/SigLIP → MLP → LLM); the mapping of each part is declared by its plugin (hook
``mllmkit_register_exporters``, :class:`ExportSpec`).
:func:`load_export` reads such a folder back into an mllmkit model; :func:`verify_export` measures
parity with transformers.
"""

from mllmkit.export.spec import ExportError, ExportSpec, LLMExport, Table

__all__ = ["ExportError", "ExportSpec", "LLMExport", "Table", "export_model", "load_export", "verify_export"]


def export_model(*args, **kwargs):
    """See :func:`mllmkit.export.write.export_model`."""
    from mllmkit.export.write import export_model as run

    return run(*args, **kwargs)


def load_export(*args, **kwargs):
    """See :func:`mllmkit.export.restore.load_export`."""
    from mllmkit.export.restore import load_export as run

    return run(*args, **kwargs)


def verify_export(*args, **kwargs):
    """See :func:`mllmkit.export.verify.verify_export`."""
    from mllmkit.export.verify import verify_export as run

    return run(*args, **kwargs)
