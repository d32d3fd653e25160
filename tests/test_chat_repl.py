"""The ``mllmkit chat`` REPL driven through stdin: every command, streamed answers, errors as lines."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import tomli_w
import torch

from mllmkit.chat import ChatSession, GenerationSettings, chat_session
from mllmkit.chat.repl import HELP, run_repl
from mllmkit.cli import main
from mllmkit.testing.toy import letters_only


@pytest.fixture
def session(plugin_host, toy_recipe):
    torch.manual_seed(0)
    session = chat_session(toy_recipe, device="cpu", precision="fp32", max_new_tokens=6)
    letters_only(session.model)
    return session


def drive(session: ChatSession, text: str, images: tuple[str, ...] = (), rc: int = 0) -> list[str]:
    """The REPL's output lines; ``rc``: its exit code (2 when a line of the piped input failed)."""
    out = io.StringIO()
    assert run_repl(session, io.StringIO(text), out, images=images) == rc
    return out.getvalue().splitlines()


def test_questions_are_answered_and_history_shown(session):
    reference = ChatSession.like(session)
    first, second = reference.ask("hello"), reference.ask("more")
    lines = drive(session, "hello\n\nmore\n:his\n")
    assert lines == [f"Assistant: {first}", f"Assistant: {second}",
                     "[1] User: hello", f"[1] Assistant: {first}", "[2] User: more", f"[2] Assistant: {second}"]


def test_help_quit_clear_and_unknown(session):
    lines = drive(session, ":h\n:cl\n:bogus\n:q\nnot asked\n", rc=2)
    help_lines = HELP.format(names="max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, "
                                   "num_beams, seed, compile_decode").splitlines()
    assert lines == [*help_lines, "(screen cleared)",
                     "error: unknown command ':bogus'; :help lists the commands"]
    assert session.turns == []  # nothing after :q was read
    assert drive(session, ":help\n:exit\n")[: len(help_lines)] == help_lines
    assert drive(session, ":quit\n:his\n") == []


def test_images_commands(session, tiny_image, tmp_path):
    reference = ChatSession.like(session)
    answer = reference.ask("what", images=[tiny_image])
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    lines = drive(session, f":img\n:image {tmp_path / 'missing.png'}\n:image {bad}\n:image {tiny_image}\n:img\n"
                           f"what\n:img\n:clh\n:img\n:his\n:reset\n:img\n", rc=2)
    assert lines[0] == "(no images)"
    assert lines[1] == f"error: image not found: {tmp_path / 'missing.png'}"
    assert lines[2].startswith(f"error: cannot read image {bad}: ")
    assert lines[3:] == [
        f"image [0] added: {tiny_image}", f"[0] {tiny_image} (goes into the next question)",
        f"Assistant: {answer}", f"[0] {tiny_image}",
        "history cleared; 1 image(s) kept", f"[0] {tiny_image} (goes into the next question)", "(no history)",
        "history and images cleared", "(no images)",
    ]


def test_bad_image_files_mid_conversation_keep_the_conversation(session, tiny_image, tmp_path):
    """Every picture Pillow fails on (a header declaring a decompression bomb, a broken PNG chunk, an
    over-long name) is one error line; the turns before it stay and the chat goes on."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
    (tmp_path / "bomb.png").write_bytes(header + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    rows = zlib.compress(bytes(25 * 8))
    small = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
    (tmp_path / "chunk.png").write_bytes(small + chunk(b"IDAT", rows[:5]) + chunk(b"\x01\x02\x03\x04", rows[5:]))
    long_name = tmp_path / ("y" * 300 + ".png")
    reference = ChatSession.like(session)
    first, second = reference.ask("hello"), reference.ask("again", images=[tiny_image])
    lines = drive(session, f"hello\n:image {tmp_path / 'bomb.png'}\n:image {tmp_path / 'chunk.png'}\n"
                           f":image {long_name}\n:image {tiny_image}\nagain\n:his\n", rc=2)
    shown = f"{str(long_name)[:60]}…{str(long_name)[-60:]} ({len(str(long_name))} characters)"
    assert lines == [
        f"Assistant: {first}",
        f"error: cannot read image {tmp_path / 'bomb.png'}: its header declares more pixels than the limit of "
        "67108864 (mllmkit.data.images.MAX_IMAGE_PIXELS)",
        f"error: cannot read image {tmp_path / 'chunk.png'}: broken PNG file (chunk b'\\x01\\x02\\x03\\x04')",
        f"error: image not found: {shown} (File name too long)",
        f"image [0] added: {tiny_image}", f"Assistant: {second}",
        "[1] User: hello", f"[1] Assistant: {first}", "[2] User: <Img><ImageHere></Img>again",
        f"[2] Assistant: {second}",
    ]


def test_start_images_and_bad_start_image_is_an_error_line(session, tiny_image, tmp_path):
    answer = ChatSession.like(session).ask("q", images=[tiny_image])
    lines = drive(session, "q\n", images=(str(tmp_path / "nope.png"), str(tiny_image)), rc=2)
    assert lines == [f"error: image not found: {tmp_path / 'nope.png'}", f"image [0] added: {tiny_image}",
                     f"Assistant: {answer}"]


def test_seed_and_conf_change_generation(session):
    short = ChatSession.like(session)
    short.settings = GenerationSettings(max_new_tokens=2)
    expected_short = short.ask("hi")
    sampled = ChatSession.like(session)
    sampled.settings = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=1.5, seed=7)
    expected_sampled = sampled.ask("hi")
    greedy = ChatSession.like(session).ask("hi")
    lines = drive(session, ":seed\n:seed 7\n:seed x\n:conf max_new_tokens=2\n:clh\nhi\n:conf top_k=abc\n"
                           ":conf nope=1\n:conf max_new_tokens=6 do_sample=true temperature=1.5\n:clh\nhi\n"
                           ":reset-conf\n:clh\nhi\n:seed\n", rc=2)
    conf_lines = lambda **changed: [f"{k} = {v}" for k, v in
                                    {**GenerationSettings(seed=7).to_dict(), **changed}.items()]
    assert lines == [
        "seed = 42", "seed = 7", "error: seed: expected int or none, found 'x'",
        *conf_lines(max_new_tokens=2), "history cleared; 0 image(s) kept", f"Assistant: {expected_short}",
        "error: top_k: expected int, found 'abc'",
        ("error: unknown setting 'nope'; settings: max_new_tokens, do_sample, temperature, top_k, top_p, "
        "repetition_penalty, num_beams, seed, compile_decode"),
        *conf_lines(max_new_tokens=6, do_sample=True, temperature=1.5), "history cleared; 0 image(s) kept",
        f"Assistant: {expected_sampled}",
        "generation settings restored", "history cleared; 0 image(s) kept", f"Assistant: {greedy}", "seed = 42",
    ]
    assert len(expected_short.encode("utf-8", errors="replace")) <= 2 * 3


def test_cli_chat_reads_stdin(plugin_host, toy_recipe, tiny_image, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "toy.toml"
    recipe.write_text(tomli_w.dumps(toy_recipe))
    torch.manual_seed(0)
    reference = chat_session(recipe, device="cpu", precision="fp32", max_new_tokens=5)
    letters_only(reference.model)
    expected = reference.ask("hey", images=[tiny_image])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hey\n:q\n"))
    import mllmkit.chat.repl as repl_module

    real_run_repl = repl_module.run_repl

    def run_repl_letters(session, *args, **kwargs):  # the CLI's own session, with the printable head
        letters_only(session.model)
        return real_run_repl(session, *args, **kwargs)

    monkeypatch.setattr(repl_module, "run_repl", run_repl_letters)
    torch.manual_seed(0)
    rc = main(["chat", str(recipe), "--device", "cpu", "--precision", "fp32", "--image", str(tiny_image),
               "--set", "chat.max_new_tokens=5"])
    assert rc == 0
    assert capsys.readouterr().out.splitlines() == [f"image [0] added: {tiny_image}", f"Assistant: {expected}"]


def test_cli_chat_user_errors_exit_2(plugin_host, toy_recipe, tmp_path, capsys):
    recipe = tmp_path / "toy.toml"
    recipe.write_text(tomli_w.dumps(toy_recipe))
    assert main(["chat", str(recipe), "--device", "cpu", "--checkpoint", str(tmp_path / "none.pth")]) == 2
    assert capsys.readouterr().err == f"mllmkit: error: checkpoint not found: {tmp_path / 'none.pth'}\n"
    assert main(["chat", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"mllmkit: error: {tmp_path}: a folder was given as the recipe, but it has "
                                       f"no recipe.toml (give a recipe file, or an mllmkit export folder)\n")


TINY_QWEN_RECIPE = {
    "model": {"vision": {"type": "eva_tiny"}, "bridges": [{"type": "qformer_tiny"}, {"type": "linear"}],
              "llm": {"type": "qwen", "preset": "qwen_tiny", "precision": "fp32"}},
    "chat": {"max_new_tokens": 4},
}


@pytest.mark.slow
def test_mllmkit_chat_subprocess_with_qwen_tiny_through_a_pipe(tmp_path, tiny_image):
    pytest.importorskip("mllmkit_llm_qwen", reason="plugins/llm_qwen is not installed")
    pytest.importorskip("mllmkit_vision_eva", reason="plugins/vision_eva is not installed")
    pytest.importorskip("mllmkit_bridge_qformer", reason="plugins/bridge_qformer is not installed")
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(TINY_QWEN_RECIPE))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for precision in ("fp32", "bf16"):
        proc = subprocess.run(
            [sys.executable, "-m", "mllmkit.cli", "chat", str(recipe), "--device", "cpu", "--precision", precision,
             "--image", str(tiny_image)],
            input=f"what is this?\n:his\n:image {tmp_path / 'nope.png'}\n:conf num_beams=2\nand now?\n:q\n",
            capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 2, proc.stderr  # the missing image's line failed: a script must see it
        lines = proc.stdout.splitlines()
        assert lines[0] == f"image [0] added: {tiny_image}"
        assert lines[1].startswith("Assistant: ")
        assert lines[2] == "[1] User: <Img><ImageHere></Img>what is this?"
        assert lines[3] == f"[1] Assistant: {lines[1][len('Assistant: '):]}"
        assert lines[4] == f"error: image not found: {tmp_path / 'nope.png'}"
        after_conf = lines[lines.index("num_beams = 2") + 1:]
        assert any(line.startswith("Assistant: ") for line in after_conf)  # the beam answer (may span lines)


@pytest.mark.slow
def test_random_init_notice_only_for_parts_the_checkpoint_does_not_hold(tmp_path):
    """eva_tiny without a weight file says it is randomly initialised; chatting with a checkpoint that
    holds every vision weight (a demo export, where the encoder trains) must not say so."""
    pytest.importorskip("mllmkit_llm_qwen", reason="plugins/llm_qwen is not installed")
    pytest.importorskip("mllmkit_vision_eva", reason="plugins/vision_eva is not installed")
    pytest.importorskip("mllmkit_bridge_qformer", reason="plugins/bridge_qformer is not installed")
    from safetensors.torch import save_file

    import mllmkit

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(TINY_QWEN_RECIPE))
    model = mllmkit.assemble(mllmkit.load_recipe(recipe))
    vision_only = tmp_path / "vision.safetensors"
    save_file({f"vision.{n}": p.detach().contiguous() for n, p in model.vision.named_parameters()}, str(vision_only))
    notice = "model.vision: no weights given: EVA encoder (2 blocks, width 64) is randomly initialised"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for extra, shown in (([], True), (["--checkpoint", str(vision_only)], False)):
        proc = subprocess.run([sys.executable, "-m", "mllmkit.cli", "chat", str(recipe), "--device", "cpu", *extra],
                              input=":q\n", capture_output=True, text=True, timeout=120, env=env, check=False)
        assert proc.returncode == 0, proc.stderr
        assert (notice in proc.stderr) == shown, proc.stderr
