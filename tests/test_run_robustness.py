"""Checkpoints, run folders, disks and signals: every user error is one message (exit 2, no
traceback), a full disk keeps the previous checkpoint, killed saves leave nothing that is listed,
a signal to the launcher ends every process it started, a failed final evaluation keeps the export,
and the progress line shows each step's own numbers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from mllmkit.errors import UserError
from mllmkit.testing.toy import TOY_MODEL_TOML
from mllmkit.train import checkpoint as ckpt


def _state(value: float):
    return {"model": {"bridges.0.proj.weight": torch.full((64, 64), value)},
            "optimizer": {"state": {}, "param_groups": []}, "scaler": {}}


def _save(run, step, value, keep_last=5):
    return ckpt.save_checkpoint(run, _state(value), {"step": step}, [ckpt.rng_state()], keep_last)


def _legacy_pickle(path):
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)


def _lying_header(path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4000000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)


# (file name, how to write it, the message after "{path}: ")
BAD_FILES = [
    ("random.pth", lambda p: p.write_bytes(os.urandom(64) + b"\x80\x02"), "not a readable torch checkpoint"),
    ("empty.pth", lambda p: p.write_bytes(b""), "not a readable torch checkpoint"),
    ("cut.safetensors", lambda p: p.write_bytes(b"\x10\0\0\0\0\0\0\0{\"w\":"), "not a readable safetensors file"),
    ("empty.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    ("lying.safetensors", _lying_header, "not a readable safetensors file"),
]


@pytest.mark.parametrize("name, write, message", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_unreadable_checkpoint_files_are_one_weights_error(tmp_path, name, write, message):
    from mllmkit.checkpoint_formats import read_checkpoint
    from mllmkit.weights import WeightsError

    path = tmp_path / name
    write(path)
    with pytest.raises(WeightsError) as info:
        read_checkpoint(path)
    assert str(info.value).startswith(f"{path}: {message} (")


def test_legacy_pickles_still_load(tmp_path):
    from mllmkit.checkpoint_formats import read_checkpoint

    _legacy_pickle(tmp_path / "model.pth")
    tensors, layout = read_checkpoint(tmp_path / "model.pth")
    assert layout == "torch" and torch.equal(tensors["w"], torch.ones(2))


def test_integer_weights_are_refused(core_plugin_host, toy_recipe, tmp_path):
    from safetensors.torch import save_file

    from mllmkit.chat.loading import load_trained_weights
    from mllmkit.weights import WeightsError

    model = __import__("mllmkit").assemble(__import__("mllmkit").load_recipe(toy_recipe))
    shape = tuple(model.bridges[0].proj.weight.shape)
    save_file({"bridges.0.proj.weight": torch.ones(shape, dtype=torch.int64)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(WeightsError) as info:
        load_trained_weights(model, tmp_path / "int.safetensors")
    assert str(info.value) == (f"{tmp_path / 'int.safetensors'}: bridges.0.proj.weight holds int64 values, the model "
                               f"expects floating point numbers for bridges.0.proj.weight")
    step = _save(tmp_path, 1, 1.0).parent.parent
    save_file({"bridges.0.proj.weight": torch.ones(2, dtype=torch.bool)},
              str(step / "checkpoints/step_0000001/trainable.safetensors"))
    with pytest.raises(UserError, match="bridges.0.proj.weight holds bool values; trainable weights are floating"):
        ckpt.load_checkpoint(step / "checkpoints/step_0000001")


def test_chat_with_a_random_bytes_checkpoint_exits_2(core_plugin_host, toy_recipe, tmp_path, capsys):
    import tomli_w

    from mllmkit.cli import main

    recipe = tmp_path / "toy.toml"
    recipe.write_text(tomli_w.dumps(toy_recipe))
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["chat", str(recipe), "--device", "cpu", "--checkpoint", str(tmp_path / "junk.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mllmkit: error: {tmp_path / 'junk.pth'}: not a readable torch checkpoint (")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_killed_saves_leave_nothing_listed_and_are_cleaned(tmp_path):
    _save(tmp_path, 1, 1.0)
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [folder / f".tmp-step_0000002-{dead.stdout.strip()}", folder / f".old-step_0000000-{dead.stdout.strip()}"]
    for path in stale:
        path.mkdir()
    mine = folder / f".tmp-step_0000009-{os.getppid()}"  # a live process's save in progress is left alone
    mine.mkdir()
    half = folder / "step_0000003"  # a removal killed midway: trainer_state.json left, weights gone
    half.mkdir()
    (half / "trainer_state.json").write_text('{"step": 3}')
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    assert ckpt.find_resume("auto", tmp_path) == folder / "step_0000001"
    with pytest.raises(UserError, match=r"not a complete checkpoint folder \(no trainable.safetensors, optimizer.pt, "
                                        r"rng.pt\)"):
        ckpt.load_checkpoint(half)
    _save(tmp_path, 4, 4.0)
    assert sorted(p.name for p in folder.iterdir()) == [mine.name, "step_0000001", "step_0000003", "step_0000004"]


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, size: str, read_only: bool = False):
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): a real full or read-only disk is what this test uses")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    with _tmpfs(tmp_path / "disk", "160k") as disk:
        _save(disk, 1, 1.0)
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:  # the disk fills up between saves
            handle.write(b"\0" * 2**20)
        with pytest.raises(UserError) as info:
            _save(disk, 2, 2.0)
        assert str(info.value) == (f"cannot write {disk / 'checkpoints/step_0000002'}: the disk is full (free space, "
                                   f"or point train.output_dir / --output-dir elsewhere); nothing was replaced "
                                   f"(earlier checkpoints are intact)")
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step_0000001"]
        engine_state, trainer_state, _ = ckpt.load_checkpoint(disk / "checkpoints/step_0000001")
        assert trainer_state == {"step": 1}
        assert torch.equal(engine_state["model"]["bridges.0.proj.weight"], torch.full((64, 64), 1.0))


RECIPE = TOY_MODEL_TOML + """
[[data.train]]
type = "demo_shapes"
size = 4
image_size = 16

[train]
precision = "fp32"
device = "cpu"
max_steps = 1
tensorboard = false
"""


def _run_folder_cases(tmp_path):
    (tmp_path / "a_file").write_text("x")
    yield "a_file", f"run folder {tmp_path / 'a_file'} is a file, not a folder; point train.output_dir or " \
                    f"--output-dir elsewhere", None
    yield "a_file/run", f"cannot write in the run folder {tmp_path / 'a_file/run'}: a file is in the way of a " \
                        f"folder (point train.output_dir / --output-dir elsewhere)", None
    yield "ro/run", f"cannot write in the run folder {tmp_path / 'ro/run'}: a read-only file system (point " \
                    f"train.output_dir / --output-dir elsewhere)", ("ro", True)
    yield "full/run", f"cannot write in the run folder {tmp_path / 'full/run'}: the disk is full (free space, or " \
                      f"point train.output_dir / --output-dir elsewhere)", ("full", False)


@pytest.mark.parametrize("case", range(4), ids=["file", "under-a-file", "read-only", "full"])
def test_run_folders_that_cannot_be_written_exit_2(core_plugin_host, tmp_path, capsys, case):
    from mllmkit.cli import main

    folder, message, disk = list(_run_folder_cases(tmp_path))[case]
    recipe = tmp_path / "toy.toml"
    recipe.write_text(textwrap.dedent(RECIPE))
    with contextlib.ExitStack() as stack:
        if disk is not None:
            stack.enter_context(_tmpfs(tmp_path / disk[0], "64k", read_only=disk[1]))
            if not disk[1]:
                with contextlib.suppress(OSError), open(tmp_path / disk[0] / "filler", "wb") as handle:
                    handle.write(b"\0" * 2**20)
        for resume in ([], ["--resume", "auto"]):
            assert main(["run", str(recipe), "--output-dir", str(tmp_path / folder), *resume]) == 2
            assert capsys.readouterr().err == f"mllmkit: error: {message}\n"


def test_threads_per_process(monkeypatch):
    from mllmkit.threads import physical_cores, threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert threads_per_process(1) == cores and threads_per_process(2) == max(1, cores // 2)
    assert threads_per_process(10_000) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process(2) == 3


WORKER = textwrap.dedent("""
    import os, pathlib, sys, time
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    pathlib.Path(sys.argv[1], f"rank{dist.get_rank()}.pid").write_text(str(os.getpid()))
    while True:  # a training loop that never ends on its own
        dist.all_reduce(torch.ones(4))
        time.sleep(0.05)
""")

LAUNCHER = textwrap.dedent("""
    import os, pathlib, sys
    from mllmkit.train.launch import run_launcher, torchrun_command

    command = torchrun_command("unused.toml", [], None, 2, None)
    command = command[:command.index("-m", 3)] + [sys.argv[2], sys.argv[1]]  # torchrun's own options, our worker
    pathlib.Path(sys.argv[1], "launcher.pid").write_text(str(os.getpid()))
    sys.exit(run_launcher(command, {**os.environ, "OMP_NUM_THREADS": "1"}))
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = pathlib.Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rpartition(")")[2].split()[0] == "Z")


@pytest.mark.slow
def test_sigterm_to_the_launcher_ends_every_process(tmp_path):
    """The launcher ``mllmkit run --nproc-per-node 2`` uses (run_launcher around the real torchrun) with
    two gloo workers that never finish; SIGTERM to it leaves no process of the tree alive 10 s later."""
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(tmp_path),
                                 str(tmp_path / "worker.py")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"rank{r}.pid").is_file() for r in (0, 1)):
        assert launcher.poll() is None, launcher.communicate()
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    from mllmkit.train.launch import _descendants

    tree = [launcher.pid, *_descendants(launcher.pid)]
    workers = [int((tmp_path / f"rank{r}.pid").read_text()) for r in (0, 1)]
    assert set(workers) <= set(tree) and len(tree) >= 4  # launcher, torchrun, 2 workers
    launcher.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, err = launcher.communicate(timeout=30)
    time.sleep(max(0.0, 10 - (time.monotonic() - sent)))  # what a scheduler sees 10 s after its SIGTERM
    assert [pid for pid in tree if _alive(pid)] == []
    assert launcher.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "mllmkit: stopped by SIGTERM; every training process was ended"


def test_resume_with_another_recipes_checkpoint_exits_2(core_plugin_host, tmp_path, capsys):
    from mllmkit.cli import main

    recipe = tmp_path / "toy.toml"
    recipe.write_text(textwrap.dedent(RECIPE))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    other = tmp_path / "mlp.toml"
    other.write_text(textwrap.dedent(RECIPE).replace('type = "linear"', 'type = "mlp"').replace("max_steps = 1",
                                                                                               "max_steps = 2"))
    capsys.readouterr()
    step = tmp_path / "run/checkpoints/step_0000001"
    assert main(["run", str(other), "--output-dir", str(tmp_path / "other"), "--resume", str(step)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"mllmkit: error: --resume {step}: does not fit this recipe's model: ")
    assert not any("Traceback" in line for line in err)


def test_a_failed_final_evaluation_keeps_the_export_and_resume_auto_does_not_repeat_it(core_plugin_host, tmp_path,
                                                                                      capsys):
    """The final evaluation fails (a best_metric no evaluation produces): the export is there all the same,
    and ``--resume auto`` of the finished run reports it finished instead of failing the same way again."""
    from mllmkit.cli import main

    recipe = tmp_path / "toy.toml"
    recipe.write_text(textwrap.dedent(RECIPE) + textwrap.dedent("""
        eval_max_new_tokens = 1

        [[data.eval]]
        type = "demo_shapes"
        split = "eval"
        size = 2
        image_size = 16

        [eval]
        best_metric = "eval_nothing"
        """))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--output-dir", str(run)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "mllmkit: error: eval.best_metric = 'eval_nothing' is not among the evaluation's metrics: ")
    assert (run / "export/trainable.safetensors").is_file()
    exported = (run / "export/trainable.safetensors").read_bytes()
    assert main(["run", str(recipe), "--output-dir", str(run), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert f"the run had finished at step 1; its final evaluation is not repeated (mllmkit eval {run / 'export'} " \
           f"--task heldout evaluates the export)" in err
    assert (run / "export/trainable.safetensors").read_bytes() == exported
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000001"]


def test_the_progress_line_shows_each_steps_own_loss_and_lr_and_the_end_once(core_plugin_host, tmp_path, capsys):
    """Captured (not a terminal) stderr: every state of the bar carries the loss and lr its step logged,
    and the final state is printed once (tqdm prints it when the bar closes)."""
    import json
    import re

    from mllmkit.cli import main

    recipe = tmp_path / "toy.toml"
    recipe.write_text(textwrap.dedent(RECIPE).replace("max_steps = 1", "max_steps = 3\nlog_every = 1"))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    states = re.findall(r"(\d)/3 \[[^]]*?(?:, loss=([\d.]+), lr=([^,]+),[^]]*)?\]", capsys.readouterr().err)
    logged = {r["step"]: r for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())}
    assert [int(n) for n, _, _ in states].count(3) == 1 and states[-1][0] == "3"
    for n, loss, lr in states[1:]:
        assert (loss, lr) == (f"{logged[int(n)]['loss']:.4f}", f"{logged[int(n)]['lr']:.2e}"), states


FAILING_WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed as dist
    from mllmkit import cli
    from mllmkit.errors import UserError
    from mllmkit.train import launch

    def rank1(*args, **kwargs):  # what goes wrong on rank 1
        if sys.argv[1] == "user":
            raise UserError("a user error on this rank")
        if sys.argv[1] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("a bug")

    dist.init_process_group("gloo")
    launch.run_command = rank1 if dist.get_rank() == 1 else lambda *args, **kwargs: dist.barrier()  # waits for 1
    sys.exit(cli.main(["run", "unused.toml"]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind, line, code", [
    ("user", "rank 1 failed: a user error on this rank", 2),
    ("kill", "rank 1 failed: killed by SIGKILL", 128 + signal.SIGKILL),
    ("bug", "rank 1 failed: RuntimeError: a bug (traceback: ", 1),
])
def test_a_failed_rank_is_one_line_naming_it_and_the_cause(tmp_path, capfd, kind, line, code):
    """The launcher of ``mllmkit run --nproc-per-node 2`` around two gloo workers of ``mllmkit.cli``: rank 1
    fails, rank 0 loses its peer; one line names rank 1 and its cause (no traceback of either rank or of
    torchrun), with the failed rank's exit code."""
    import json

    from mllmkit.train.launch import run_launcher, torchrun_command

    (tmp_path / "worker.py").write_text(FAILING_WORKER)
    command = torchrun_command("unused.toml", [], None, 2, None)
    command = command[:command.index("-m", 3)] + [str(tmp_path / "worker.py"), kind]
    assert run_launcher(command, {**os.environ, "OMP_NUM_THREADS": "1"}) == code
    err = capfd.readouterr().err
    assert err.startswith(line) and len(err.splitlines()) == 1, err
    if kind == "bug":  # the traceback is in the error file the line names
        error_file = pathlib.Path(err.removeprefix(line).rstrip(")\n"))
        assert 'raise RuntimeError("a bug")' in json.loads(error_file.read_text())["message"]["extraInfo"]["py_callstack"]
