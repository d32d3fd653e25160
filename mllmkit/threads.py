"""How many CPU threads torch uses per process: set deliberately, not left to chance.

torch's intra-op pool defaults to every core it sees, in every process: N DDP processes on one
machine then run N times too many threads, and on a busy machine oversubscribed threads run many
times slower. :func:`threads_per_process` gives each process its share of the physical cores this
process may run on (``sched_getaffinity``, hyper-threads counted once); ``OMP_NUM_THREADS`` set by
the user always wins. ``mllmkit run`` (each process, and the torchrun it starts) and ``mllmkit
chat``/``webui`` apply it with :func:`set_cpu_threads`.
"""

from __future__ import annotations

import os
import pathlib

__all__ = ["physical_cores", "set_cpu_threads", "threads_per_process"]


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (logical CPUs when the topology is unknown)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = pathlib.Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" +
                      (topology / "core_id").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def threads_per_process(processes: int = 1) -> int:
    """``OMP_NUM_THREADS`` if set, else the physical cores divided among ``processes`` (at least 1)."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, physical_cores() // max(1, processes))


def set_cpu_threads(processes: int = 1) -> int:
    """Set torch's intra-op threads to :func:`threads_per_process`; returns the number."""
    import torch

    threads = threads_per_process(processes)
    torch.set_num_threads(threads)
    return threads
