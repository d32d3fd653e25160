"""The built-in evaluation tasks, registered by the core's builtin plugin like any task plugin's."""

from __future__ import annotations

from mllmkit.eval.tasks import heldout, mmbench, mme, pope, vqa
from mllmkit.registry import ComponentSpec

__all__ = ["SPECS"]

SPECS = [
    ComponentSpec("heldout", heldout.HeldOutConfig, heldout.build_heldout,
                  "exact match on the recipe's [[data.eval]] sets"),
    ComponentSpec("demo_shapes", heldout.DemoShapesTaskConfig, heldout.build_demo_shapes,
                  "exact match on the demo's held-out shapes questions"),
    ComponentSpec("pope", pope.PopeConfig, pope.build, "POPE yes/no hallucination probes (accuracy, precision, "
                                                         "recall, F1 per split)"),
    ComponentSpec("mme", mme.MmeConfig, mme.build, "MME perception and cognition scores (acc, acc+)"),
    ComponentSpec("mmbench", mmbench.MmbenchConfig, mmbench.build, "MMBench multiple choice, circular evaluation"),
    ComponentSpec("vqav2", vqa.Vqav2Config, vqa.build_vqav2, "VQAv2 open answers, soft accuracy"),
    ComponentSpec("textvqa", vqa.TextVqaConfig, vqa.build_textvqa, "TextVQA open answers, soft accuracy"),
]
