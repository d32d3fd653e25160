"""``mllmkit run``: pick the run folder, launch torchrun when asked, train, print how to chat.

With ``--nproc-per-node N`` (and not already under torchrun) this starts torchrun
(``python -m mllmkit.train.launch --nproc_per_node N --master_addr 127.0.0.1 --master_port <free>
-m mllmkit.cli run ...``, torchrun's own ``run`` behind :func:`torchrun_main`) and returns its exit
code; every worker then reads torchrun's environment. A worker's failure goes to torchrun's error
file (:func:`report_to_launcher`) and the launcher prints one line, ``rank N failed: <cause>``, in
place of the workers' and torchrun's tracebacks. A signal that stops ``mllmkit run`` stops torchrun
and every worker (:func:`run_launcher`). Each process sets its CPU threads to its share of the
physical cores (:mod:`mllmkit.threads`). A recipe whose parallel backend needs several processes
(``processes_needed()``: a pipeline, one per stage) without a launcher and without
``--nproc-per-node`` starts that many itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback

from mllmkit.errors import UserError
from mllmkit.threads import set_cpu_threads, threads_per_process
from mllmkit.train.dist import free_port

__all__ = ["LAUNCHER_ENV", "default_run_dir", "report_to_launcher", "run_command", "run_launcher",
           "torchrun_command", "torchrun_main"]

LAUNCHER_ENV = "MLLMKIT_LAUNCHER"
"""Set by :func:`torchrun_main` for its workers: they leave the report of a failure to its one line."""


def default_run_dir(recipe) -> pathlib.Path:
    """``train.output_dir``, else ``./runs/<recipe file name>``."""
    if recipe.train.output_dir is not None:
        return recipe.train.output_dir
    name = recipe.path.stem if recipe.path is not None else "run"
    return pathlib.Path.cwd() / "runs" / name


def torchrun_command(recipe: str, overrides: list[str], resume: str | None, nproc_per_node: int,
                     output_dir: str | None) -> list[str]:
    command = [sys.executable, "-m", "mllmkit.train.launch", "--nproc_per_node", str(nproc_per_node),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mllmkit.cli", "run", recipe]
    for override in overrides:
        command += ["--set", override]
    if resume is not None:
        command += ["--resume", resume]
    if output_dir is not None:
        command += ["--output-dir", output_dir]
    return command


def run_launcher(command: list[str], env: dict[str, str], grace_s: float = 8.0) -> int:
    """Run the torchrun ``command`` and return its exit code. SIGTERM, SIGINT or SIGHUP to this process
    (a scheduler, ``timeout``, systemd, Ctrl-C) is passed on to torchrun, which stops its workers; what is
    still alive ``grace_s`` later — torchrun or any process it started — is killed, so nothing keeps
    training as an orphan."""
    proc = subprocess.Popen(command, env=env)
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if not received:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in watched}
    deadline = None
    try:
        while proc.poll() is None:
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"mllmkit: stopped by {signal.Signals(received[0]).name}; every training process was ended",
              file=sys.stderr, flush=True)
        return 128 + received[0]
    return proc.returncode


def torchrun_main(argv: list[str]) -> int:
    """torchrun with ``argv`` (``torch.distributed.run``'s options); when a worker fails, one line names the
    rank and the cause (:func:`_first_failure`) in place of torchrun's traceback. The exit code is the failed
    worker's (2 for a user error; 128 + N for signal N), or 128 + N when signal N stopped torchrun itself."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # its two lines on a failure (stopping the other ranks, the first failure's exit code) say what ours says
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_ENV] = "1"
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        rank, failure = _first_failure(exc.failures)
        print(f"rank {rank} failed: {_cause(failure)}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + exc.sigval
    return 0


def report_to_launcher(message: str, with_traceback: bool) -> bool:
    """In a worker of :func:`torchrun_main`: write this worker's failure to torchrun's error file (torch
    elastic's format) and return True; the launcher prints it, naming the rank. Elsewhere (one process,
    a plain torchrun) return False: the caller prints it. ``with_traceback``: the exception being handled's."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or LAUNCHER_ENV not in os.environ:
        return False
    info = {"timestamp": str(int(time.time()))}
    if with_traceback:
        info["py_callstack"] = traceback.format_exc()
    data = {"message": {"message": message, "extraInfo": info}}
    try:
        pathlib.Path(path).write_text(json.dumps(data))
    except OSError:
        return False
    return True


def _first_failure(failures: dict) -> tuple[int, object]:
    """The failure that started it. torchrun lists the ranks it stopped with SIGTERM as failures too: those
    come last; then a rank that died without a word (killed, ``os._exit``), since the errors of the others
    follow from the lost peer; then the earliest error file."""
    def order(item):
        rank, failure = item
        written = _written(failure)
        return (failure.exitcode == -signal.SIGTERM, written is not None,
                os.stat(failure.error_file).st_mtime_ns if written else 0, rank)
    return min(failures.items(), key=order)


def _written(failure) -> dict | None:
    """What the worker wrote to its error file (see :func:`report_to_launcher`), if anything."""
    message = failure.error_file_data.get("message") if os.path.isfile(failure.error_file) else None
    if isinstance(message, str):
        return {"message": message, "extraInfo": {}}
    return message


def _cause(failure) -> str:
    written = _written(failure)
    if written is None:
        if failure.exitcode < 0:
            return f"killed by {failure.signal_name()}"
        return f"exited with code {failure.exitcode} without an error message"
    if written.get("extraInfo", {}).get("py_callstack"):
        return f"{written['message']} (traceback: {failure.error_file})"
    return written["message"]


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_command(recipe: str, overrides: list[str], resume: str | None = None, nproc_per_node: int | None = None,
                output_dir: str | None = None) -> int:
    """Train the recipe; returns the process exit code."""
    if nproc_per_node is not None and nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, found {nproc_per_node}")
    from mllmkit.recipe import load_recipe
    from mllmkit.train.checkpoint import check_run_dir
    from mllmkit.train.loop import build_backend, train

    loaded = load_recipe(recipe, overrides)  # a bad recipe stops here, before any process starts
    missing = loaded.missing_inputs()
    if missing:
        raise UserError("the recipe names inputs that are not there (paths are relative to the recipe's "
                        "folder, then $MLLMKIT_HOME):\n  " + "\n  ".join(missing))
    launched = "LOCAL_RANK" in os.environ
    needed = build_backend(loaded).processes_needed()
    if nproc_per_node is None and not launched and needed > 1:
        print(f"mllmkit: parallel.type = '{loaded.parallel.type}' needs {needed} processes: starting them with "
              f"torchrun (--nproc-per-node N for data parallel as well)", file=sys.stderr, flush=True)
        nproc_per_node = needed
    if nproc_per_node is not None and not launched:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(nproc_per_node))}
        return run_launcher(torchrun_command(recipe, overrides, resume, nproc_per_node, output_dir), env)

    run_dir = pathlib.Path(output_dir).resolve() if output_dir else default_run_dir(loaded)
    check_run_dir(run_dir)  # a file in its place, a read-only or full disk: said now, not after the model is built
    set_cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    result = train(loaded, run_dir, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nfinished {result.steps} steps; run folder: {result.run_dir}")
        if result.losses:
            print(f"  last training loss: {result.losses[-1]:.4f}")
        if result.eval and "eval_loss" in result.eval:  # the recipe's held-out set; benchmark tasks print their own
            line = f"  held-out: loss {result.eval['eval_loss']:.4f}, exact match {result.eval['eval_accuracy']:.1%} " \
                   f"of {result.eval['eval_questions']} questions"
            if "chance_accuracy" in result.eval:
                line += f" (chance {result.eval['chance_accuracy']:.1%})"
            print(line)
        if result.export_dir is not None:
            print(f"chat with it:  mllmkit chat {recipe} --checkpoint {result.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(torchrun_main(sys.argv[1:]))
