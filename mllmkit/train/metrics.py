"""Where training reports go: ``metrics.jsonl`` and TensorBoard in the run folder, and a progress bar.

Only the main rank writes. Each JSONL line is one record (``{"step": …, "loss": …}`` for training,
``eval_*`` keys for evaluation). On resume, lines past the resumed step are dropped so the file
reads like one uninterrupted run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

__all__ = ["MetricsWriter", "read_metrics"]


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` and scalars to TensorBoard (when it is installed and enabled)."""

    def __init__(self, run_dir: pathlib.Path, enabled: bool, tensorboard: bool = True, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional at run time
                self.tb = None
            else:
                self.tb = SummaryWriter(str(pathlib.Path(run_dir) / "tensorboard"), purge_step=resume_step or None)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self.tb.add_scalar(f"{key}/{sub}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
