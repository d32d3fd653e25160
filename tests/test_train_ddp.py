"""DDP on gloo with 2 processes equals one process with the same global batch; the launcher runs
torchrun itself with --nproc-per-node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mllmkit.train.dist import free_port

SCRIPT = textwrap.dedent('''
    import json, sys
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import ToyPlugin
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    reset_plugin_host(build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin())]))
    recipe = json.loads(sys.argv[1])
    result = train(load_recipe(recipe), sys.argv[2])
    if result.export_dir is not None:
        (result.run_dir / "result.json").write_text(json.dumps({"losses": result.losses, "eval": result.eval}))
''')


def _recipe(toy_recipe, parallel: str, grad_accum: int) -> dict:
    recipe = dict(toy_recipe)
    recipe["model"]["llm"]["trainable"] = True
    recipe["data"] = {"train": [{"type": "demo_shapes", "size": 32, "image_size": 16}],
                      "eval": [{"type": "demo_shapes", "split": "eval", "size": 6, "image_size": 16}]}
    recipe["train"] = {"precision": "fp32", "lr": 5e-3, "micro_batch_size": 2, "grad_accum": grad_accum,
                       "max_steps": 4, "warmup_steps": 1, "log_every": 1, "eval_max_new_tokens": 2,
                       "tensorboard": False, "device": "cpu"}
    recipe["parallel"] = {"type": parallel, **({"timeout_s": 60} if parallel == "ddp" else {})}
    return recipe


def _env() -> dict:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(plugin_host, toy_recipe, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    ddp = _recipe(toy_recipe, "ddp", grad_accum=1)    # 2 ranks × 2 samples
    single = _recipe(toy_recipe, "single", grad_accum=2)  # 1 rank × 2 micro-batches × 2 samples
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
                           json.dumps(ddp), str(tmp_path / "ddp")], env=_env(), capture_output=True, text=True, check=False,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(script), json.dumps(single), str(tmp_path / "single")], env=_env(),
                          capture_output=True, text=True, check=False, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((tmp_path / "ddp/result.json").read_text())
    b = json.loads((tmp_path / "single/result.json").read_text())
    assert len(a["losses"]) == 4
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    assert a["eval"]["eval_loss"] == pytest.approx(b["eval"]["eval_loss"], abs=1e-5)
    assert a["eval"]["eval_questions"] == b["eval"]["eval_questions"] == 6
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "ddp/export/trainable.safetensors"))
    wb = load_file(str(tmp_path / "single/export/trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
    # only rank 0 wrote: one metrics file with one line per step plus the eval
    lines = (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 4]
    # the DDP checkpoint loads under the single backend and continues
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    more = _recipe(toy_recipe, "single", grad_accum=2)
    more["train"]["max_steps"] = 5
    result = train(load_recipe(more), tmp_path / "ddp", resume="auto")
    assert result.steps == 5 and len(result.losses) == 1


@pytest.mark.slow
def test_a_dead_rank_stops_the_others(plugin_host, tmp_path):
    script = tmp_path / "die.py"
    script.write_text(textwrap.dedent('''
        import os, sys, torch
        from mllmkit.builtin.backends import DDPBackend, DDPConfig
        backend = DDPBackend(DDPConfig(timeout_s=5), "cpu")
        backend.setup()
        if backend.rank == 1:
            os._exit(3)
        backend.all_reduce(torch.ones(1))
    '''))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)],
                          env=_env(), capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    from mllmkit.errors import UserError
    from mllmkit.train.dist import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError) as info:
        pick_device("auto", local_rank=1)
    assert str(info.value) == ("this process is number 1 on its node but only 1 GPU(s) are visible; launch at "
                               "most one process per GPU (--nproc-per-node)")
